"""Command line: `python -m benchmarks openai --help`."""

from __future__ import annotations

import argparse
import os
import sys

from ..client import Target, normalize_base, parse_model, parse_target
from . import __doc__ as PACKAGE_DOC
from .prompts import PROMPT_SETS
from .scenarios import SCENARIOS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks openai",
        description=PACKAGE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME",
        help="a model to benchmark (repeat for several); DISPLAY=NAME shows DISPLAY and sends NAME",
    )
    p.add_argument(
        "--target",
        action="append",
        nargs="+",
        default=[],
        metavar=("LABEL=URL", "MODEL"),
        help="a server to compare, with its own models (default: the --model list); repeatable. "
        "Targets run one after another.",
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    add_workload_options(p)
    return p


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """What each scenario sends, the time budget, and where the outputs go."""
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--prompts",
        choices=sorted(PROMPT_SETS),
        default="seed",
        help="seed: the seed's five questions; detailed: the same asking for long answers, so a server "
        "that ignores ignore_eos still produces max_tokens",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 5, 10, 16, 32])
    p.add_argument("--batch-size", type=int, default=5, help="concurrent requests of the batching table (seed: 5)")
    p.add_argument("--paged-users", type=int, default=10)
    p.add_argument("--sweep-min-requests", type=int, default=2, help="requests per sweep level at least")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument(
        "--max-duration-s",
        type=float,
        default=1800.0,
        help="time budget of the whole run: work not started by then is reported as skipped",
    )
    p.add_argument(
        "--out-dir",
        default="results/openai_bench",
        help="where the JSON, markdown and PNGs go (results/ is git-ignored)",
    )
    p.add_argument("--label", default="openai_bench", help="file name stem of the outputs")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no benchmark: render the results of earlier runs (their JSON files) as one report",
    )
    p.add_argument(
        "--cpu-profile",
        action="store_true",
        help="sample this machine's processes: cores busy per process during each scenario "
        "(for a server on this machine; shows other load too)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def targets_from(args, p: argparse.ArgumentParser) -> list[Target]:
    try:
        if args.target:
            return [parse_target(t, args.model, args.api_key) for t in args.target]
        if not args.base_url or not args.model:
            p.error("give --base-url and --model, or --target LABEL=URL [MODEL ...]")
        return [Target("server", normalize_base(args.base_url), [parse_model(m) for m in args.model], args.api_key)]
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.merge:
        from .runner import merge_files

        merge_files(args.merge, args)
        return 0
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        p.error(f"unknown scenarios {unknown}; choose from {','.join(SCENARIOS)}")
    if args.max_tokens < 2:
        p.error("--max-tokens must be at least 2 (generation speed needs two tokens)")
    targets = targets_from(args, p)
    from .runner import run

    doc = run(targets, args)
    failed = sum(1 for t in doc["targets"] for m in t["models"] if not m["warm_up"]["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
