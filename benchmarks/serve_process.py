"""`serve run` as a child process, for benchmarks and end-to-end tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start_serve_run(
    config: str | Path, out=subprocess.DEVNULL, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`serve run [ARGS] CONFIG` in its own session (Ctrl-C goes to its whole group), with SIGINT
    at its default whatever this process inherited: started from a background job (`nohup ... &`),
    SIGINT is ignored, stays ignored across exec, and serve run would never shut down on it."""
    return subprocess.Popen(
        [str(BIN / "serve"), "run", *args, str(config)],
        cwd=ROOT,
        stdout=out,
        env=env,
        stderr=subprocess.STDOUT if out is not subprocess.DEVNULL else subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
