"""Build llama.cpp's own ``llama-server`` once, from the llama.cpp tree that ships inside the
llama-cpp-python source distribution erllama depends on (the same llama.cpp erllama runs),
and cache the binary under ``bench/.cache/``.

    python bench/llama_server.py          # build if missing; print the binary's path
    python bench/llama_server.py --path   # print the path if built, else nothing (exit 1)

The build downloads the sdist from the package index (pip download), configures with CMake
(no curl, native CPU flags, no tests or examples) and builds only the server target: about
18 minutes on 2 cores. A benchmark without the binary reports that it is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(__file__).resolve().parent / ".cache"
BINARY = CACHE / f"llama-server-{VERSION}" / "llama-server"


def built() -> Path | None:
    return BINARY if BINARY.is_file() and os.access(BINARY, os.X_OK) else None


def build(jobs: int = 2) -> Path:
    if (done := built()) is not None:
        return done
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama-server needs {tool} on PATH")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-q", f"llama-cpp-python=={VERSION}", "-d", str(work)],
            check=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        out = work / "build"
        subprocess.run(
            ["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            check=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs)],
            check=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        (binary,) = out.glob("**/bin/llama-server")
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, BINARY)
    return BINARY


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", action="store_true", help="print the binary's path if built")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = p.parse_args()
    if args.path:
        found = built()
        if found is None:
            return 1
        print(found)
        return 0
    print(build(args.jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
