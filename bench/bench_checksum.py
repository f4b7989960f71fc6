"""Checksum throughput on a 46 MB random buffer (the size of a mid-sized KV state).

Why it matters: verifying a row must cost at most a quarter of restoring it, and a llama.cpp
state set runs at about 4.3 GB/s, so the row checksum needs well over 17 GB/s.

Prints three tables: throughput over the whole buffer (memory-bound), over a 1 MiB buffer
already in cache (what read_row sees: it hashes each chunk as it is read), and read_row on a
46 MiB row against a bare read of the same file.

Run: ``.venv/bin/python bench/bench_checksum.py`` (optional: ``pip install google-crc32c
crc32c`` into the venv first to include them; they are not project dependencies).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import zlib
from collections.abc import Callable

import xxhash

SIZE = 46 * 1024 * 1024
REPEATS = 5


def _candidates() -> dict[str, Callable[[bytes], object]]:
    funcs: dict[str, Callable[[bytes], object]] = {
        "xxhash.xxh3_64": xxhash.xxh3_64_intdigest,
        "xxhash.xxh3_128": xxhash.xxh3_128_intdigest,
        "xxhash.xxh64": xxhash.xxh64_intdigest,
        "xxhash.xxh3_64 (streaming, 1 MiB updates)": _xxh3_streaming,
        "zlib.crc32": zlib.crc32,
        "hashlib.blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    try:
        import google_crc32c  # type: ignore[import-not-found,unused-ignore]

        funcs["google_crc32c.value"] = google_crc32c.value
    except ImportError:
        print("google-crc32c not installed: skipped")
    try:
        import crc32c  # type: ignore[import-not-found,unused-ignore]

        funcs["crc32c.crc32c"] = crc32c.crc32c
    except ImportError:
        print("crc32c not installed: skipped")
    return funcs


def _xxh3_streaming(data: bytes) -> int:
    # How format.py hashes: the prefix and then the payload, through one hasher object.
    h = xxhash.xxh3_64()
    view = memoryview(data)
    step = 1 << 20
    for i in range(0, len(view), step):
        h.update(view[i : i + step])
    return h.intdigest()


def bench_read_row(data: bytes) -> None:
    """What verification adds to reading a row: read_row (checksums, key) against a plain
    read of the same file into a preallocated buffer, on tmpfs (the ram_file tier)."""
    from erllama.cache.format import encode_row, read_row
    from erllama.cache.key import Namespace

    ns = Namespace(b"\x01" * 32, 1, b"\x02" * 32)
    tokens = list(range(4096))
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".kvc") as f:
        f.write(encode_row(ns, tokens, "finish", data))
        f.write(data)
        f.flush()
        key = ns.key(tokens)

        def plain(step: int) -> None:
            # The same loop as read_row, minus every check.
            fd = os.open(f.name, os.O_RDONLY)
            try:
                view = memoryview(bytearray(os.fstat(fd).st_size))
                done = 0
                while done < len(view):
                    done += os.preadv(fd, [view[done : done + step]], done)
            finally:
                os.close(fd)

        times = {}
        runs = (
            ("plain read, one call", lambda: plain(len(data) * 2)),
            ("plain read, 256 KiB chunks", lambda: plain(256 << 10)),
            ("read_row", lambda: read_row(f.name, key)),
        )
        for name, fn in runs:
            best = float("inf")
            for _ in range(REPEATS * 2):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
            print(f"{name:45s} {len(data) / best / 1e9:8.2f} {best * 1e3:8.2f}")
        extra = times["read_row"] - times["plain read, 256 KiB chunks"]
        print(f"read_row minus the plain chunked read: {extra * 1e3:+.2f} ms")


def main() -> None:
    data = os.urandom(SIZE)
    print(f"buffer: {SIZE / 2**20:.0f} MiB, best of {REPEATS}, cpus={os.cpu_count()}")
    print(f"{'function':45s} {'GB/s':>8s} {'ms':>8s}")
    for name, fn in _candidates().items():
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            fn(data)
            best = min(best, time.perf_counter() - t0)
        print(f"{name:45s} {SIZE / best / 1e9:8.2f} {best * 1e3:8.2f}")
    small = data[: 1 << 20]
    print("in cache (1 MiB buffer, hashed 200 times):")
    for name, fn in _candidates().items():
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(200):
                fn(small)
            best = min(best, (time.perf_counter() - t0) / 200)
        print(f"{name:45s} {len(small) / best / 1e9:8.2f} {best * 1e3:8.3f}")
    bench_read_row(data)


if __name__ == "__main__":
    main()
