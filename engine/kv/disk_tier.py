"""The prefix cache's disk tier: full KV blocks kept in files, so that they outlive the process.

An unloaded model's process exits with its block pool; the next load (a governor reload, a new
`serve run`, another replica on the same machine) reads the blocks back from here instead of
computing its usual system prompt again.

- Keys: a block file is named by the block's chained hash, the very key of the prefix index
  (engine.kv.prefix_cache), so whatever the chain is salted with (the model, its KV format, image
  contents) is part of it. The directory is one per *identity*: the model's weights, the cache's
  block size and K/V format, and `FORMAT_VERSION`; every file's header repeats it, with its hash,
  its parent's hash and its tokens, which a read compares with the prompt's (as a RAM hit does).
- Writes happen behind: the loop thread offers a block (its arrays copied out) to a writer thread
  through a queue bounded in bytes; an offer past the bound is dropped and counted, never waited
  for. A file is written under a temporary name and renamed into place, so a reader (or a
  restart after SIGKILL) sees a whole file or none; temporary files are never read.
- Reads happen on the loop thread (`read`): a file whose header or checksum does not match is
  skipped with a warning, removed, and never loaded as K/V.
- The byte cap (`max_bytes`) is kept least recently used first out (a hit refreshes a file's
  mtime, which orders the index when it is read again at the next load).
- A write that fails (a full or failing disk) turns writing off with a warning: the model goes on
  with its RAM cache alone.

Several processes may share a directory (replicas of one model on one machine): a block missing
from the index is looked for on disk once per prompt (another replica may have written it since),
a file another one evicted is a miss; each keeps the cap for what it knows. Files are the owner's
only (0600, the directory 0700): they hold prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"ORCHKV\x00\x01"
SUFFIX = ".kvb"
STALE_TMP_S = 600.0  # a temporary file this old was left by a killed writer
_STOP = object()

Shapes = list[tuple[tuple[int, ...], str]]  # each array's shape and numpy dtype name, in order


def identity_digest(weights_id: str, salt: bytes, block_size: int, kv_dtype: str, kv_bits: int | None) -> bytes:
    """What a block's K/V depends on besides its tokens: the weights, the cache's format, ours."""
    text = f"v{FORMAT_VERSION}|{weights_id}|{block_size}|{kv_dtype}|{kv_bits}|".encode()
    return hashlib.blake2b(text + salt, digest_size=16).digest()


class DiskTier:
    def __init__(self, directory: Path, identity: bytes, shapes: Shapes, max_bytes: int, queue_bytes: int):
        """Opens (creates) `directory` and indexes the block files in it. Raises OSError."""
        self.dir = Path(directory)
        self.identity = identity
        self.shapes = [(tuple(s), str(d)) for s, d in shapes]
        self.block_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in self.shapes)
        self.max_bytes = max_bytes
        self.queue_bytes = queue_bytes
        self.writing = True
        self.counters = {"hits": 0, "writes": 0, "dropped": 0, "errors": 0, "skipped": 0, "evicted": 0}
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file bytes, least recently used first
        self._bytes = 0
        self._queued: set[bytes] = set()
        self._queued_bytes = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # prompts at rest: the owner's only
        self._scan()
        self._thread = threading.Thread(target=self._write_loop, name="orchard-kv-disk", daemon=True)
        self._thread.start()

    # --- the index -------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the directory's block files, oldest first; remove stale temporary files."""
        found = []
        now = time.time()
        for f in self.dir.iterdir():
            try:
                st = f.stat()
                if f.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP_S:
                    f.unlink()
                elif f.suffix == SUFFIX and len(f.stem) == 32:
                    found.append((st.st_mtime_ns, bytes.fromhex(f.stem), st.st_size))
            except (OSError, ValueError):
                continue  # gone meanwhile, or not one of ours
        for _, h, size in sorted(found):
            self._index[h] = size
            self._bytes += size
        self._evict()

    def has(self, h: bytes) -> bool:
        return h in self._index

    def _adopt(self, h: bytes) -> bool:
        """Index block `h` if its file exists after all: another process (a replica of the same
        model on this machine) wrote it after this one read the directory."""
        try:
            size = self._path(h).stat().st_size
        except OSError:
            return False
        with self._lock:
            if h not in self._index:
                self._index[h] = size
                self._bytes += size
        return True

    def _path(self, h: bytes) -> Path:
        return self.dir / f"{h.hex()}{SUFFIX}"

    def _drop(self, h: bytes, unlink: bool) -> None:
        with self._lock:
            size = self._index.pop(h, None)
            if size is not None:
                self._bytes -= size
        if unlink:
            try:
                self._path(h).unlink()
            except OSError:
                pass

    def _evict(self) -> None:
        """Least recently used files out until the directory is within its cap."""
        while True:
            with self._lock:
                if self._bytes <= self.max_bytes or not self._index:
                    return
                h, size = self._index.popitem(last=False)
                self._bytes -= size
                self.counters["evicted"] += 1
            try:
                self._path(h).unlink()
            except OSError:
                pass

    # --- reads (the loop thread) ---------------------------------------------------------------

    def read(self, h: bytes, parent: bytes, tokens: tuple[int, ...]) -> list[np.ndarray] | None:
        """The arrays of block `h` (after `parent`, holding `tokens`), or None: not on disk, or a
        file that does not hold exactly that block of this identity (skipped with a warning and
        removed: never loaded as K/V)."""
        if h not in self._index and not self._adopt(h):
            return None
        path = self._path(h)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # another process evicted it
            self._drop(h, unlink=False)
            return None
        except OSError as exc:
            log.warning("disk KV block %s unreadable, skipped: %s", path.name, exc)
            self.counters["errors"] += 1
            self._drop(h, unlink=False)
            return None
        try:
            arrays = self._decode(data, h, parent, tokens)
        except ValueError as exc:
            log.warning("disk KV block %s skipped (not loaded as K/V): %s", path.name, exc)
            self.counters["skipped"] += 1
            self._drop(h, unlink=True)
            return None
        with self._lock:
            if h in self._index:
                self._index.move_to_end(h)
        try:
            os.utime(path)  # its place in the LRU at the next load
        except OSError:
            pass
        self.counters["hits"] += 1
        return arrays

    def _decode(self, data: bytes, h: bytes, parent: bytes, tokens: tuple[int, ...]) -> list[np.ndarray]:
        """A file's arrays, after checking everything its header says; ValueError says what is off."""
        if len(data) < len(MAGIC) + 4 or data[: len(MAGIC)] != MAGIC:
            raise ValueError("not a block file of this format version")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4 + n
        if start > len(data):
            raise ValueError("truncated header")
        try:
            head = json.loads(data[len(MAGIC) + 4 : start])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("unreadable header") from exc
        want = {"version": FORMAT_VERSION, "identity": self.identity.hex(), "hash": h.hex(), "parent": parent.hex()}
        for key, value in want.items():
            if head.get(key) != value:
                raise ValueError(f"another {key}")
        if tuple(head.get("tokens", ())) != tuple(tokens):
            raise ValueError("other tokens")
        if [(tuple(s), d) for s, d in head.get("arrays", [])] != self.shapes:
            raise ValueError("other array shapes or dtypes")
        payload = memoryview(data)[start:]
        if len(payload) != self.block_bytes:
            raise ValueError(f"truncated payload ({len(payload)} of {self.block_bytes} bytes)")
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != head.get("checksum"):
            raise ValueError("checksum mismatch")
        out, offset = [], 0
        for shape, dtype in self.shapes:
            a = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
            offset += a.nbytes
            out.append(a)
        return out

    # --- writes (offered on the loop thread, written on the writer's) -----------------------

    def offer(self, h: bytes, parent: bytes, tokens: tuple[int, ...], arrays: Callable[[], list[np.ndarray]]) -> bool:
        """Queue block `h` to be written (`arrays()` copies it out, now, only when it is taken);
        False when it is not: on disk or queued already, writing is off, or the queue is full
        (dropped, counted). Never blocks."""
        if not self.writing or h in self._index or h in self._queued:
            return False
        if self._queued_bytes + self.block_bytes > self.queue_bytes or self.block_bytes > self.max_bytes:
            self.counters["dropped"] += 1
            return False
        with self._lock:
            self._queued.add(h)
            self._queued_bytes += self.block_bytes
        self._queue.put((h, parent, tokens, arrays()))
        return True

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            h, parent, tokens, arrays = item
            try:
                if self.writing:
                    self._write(h, parent, tokens, arrays)
            except Exception:  # noqa: BLE001 - the writer must not die with blocks still queued
                log.exception("disk KV cache writer failed: RAM-only from now on")
                self.writing = False
                self.counters["errors"] += 1
            finally:
                with self._lock:
                    self._queued.discard(h)
                    self._queued_bytes -= self.block_bytes

    def _write(self, h: bytes, parent: bytes, tokens: tuple[int, ...], arrays: list[np.ndarray]) -> None:
        head = {
            "version": FORMAT_VERSION,
            "identity": self.identity.hex(),
            "hash": h.hex(),
            "parent": parent.hex(),
            "tokens": [int(t) for t in tokens],
            "arrays": [[list(a.shape), a.dtype.name] for a in arrays],
            "checksum": _checksum(arrays),
        }
        header = json.dumps(head).encode()
        path = self._path(h)
        tmp = self.dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                for a in arrays:
                    f.write(np.ascontiguousarray(a).data)
            size = tmp.stat().st_size
            os.replace(tmp, path)
        except OSError as exc:
            self.writing = False
            self.counters["errors"] += 1
            log.warning("disk KV cache write failed (%s): RAM-only from now on", exc)
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        with self._lock:
            self._index[h] = size
            self._bytes += size
            self.counters["writes"] += 1
        self._evict()

    # --- the end ---------------------------------------------------------------------------

    def close(self, timeout_s: float) -> int:
        """Write what is queued, for `timeout_s` at most; the blocks left unwritten (lost)."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        lost = len(self._queued)
        if lost:
            self.writing = False
            log.warning("disk KV cache: %d queued block(s) not written within %.1fs", lost, timeout_s)
        return lost

    def stats(self) -> dict:
        return {
            "enabled": True,
            "path": str(self.dir),
            "entries": len(self._index),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "writing": self.writing,
            "queued": len(self._queued),
            **self.counters,
        }


def _checksum(arrays: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def open_disk_tier(
    config, root: Path | None, weights_id: str | None, salt: bytes, storage
) -> tuple[DiskTier | None, str]:
    """The disk tier of one model's paged cache (`config`: the EngineConfig), or None and why not.
    `root`: the directory of every model's tiers unless the config names one; `weights_id`: a digest of the model's files;
    `storage`: its KVStorage (the shapes of a block's arrays)."""
    disk = config.disk_cache
    if not disk.enabled:
        return None, "engine.disk_cache.enabled is false"
    root = Path(disk.path).expanduser() if disk.path else root
    if root is None or weights_id is None:
        return None, "no model files to key the disk cache on"
    kv_bits = config.kv_bits
    identity = identity_digest(weights_id, salt, storage.block_size, str(storage.dtype), kv_bits)
    shapes = [(a.shape, a.dtype.name) for a in storage.block_arrays(0)]  # block 0 always exists
    directory = Path(root) / identity.hex()
    try:
        tier = DiskTier(directory, identity, shapes, int(disk.max_gb * 1e9), disk.queue_mb * 2**20)
    except OSError as exc:
        log.warning("disk KV cache off, RAM only: cannot open %s: %s", directory, exc)
        return None, f"cannot open {directory}: {exc}"
    log.info("disk KV cache at %s: %d blocks, %d bytes", directory, len(tier._index), tier._bytes)
    return tier, ""
