"""llama.cpp's tools for the benchmarks: found, or built once from the llama.cpp sources inside PyPI's
llama-cpp-python sdist (about 10 minutes on 2 cores), cached under $MIAOTUI_HOME/llama.cpp/.

Not part of miaotui: benchmarks measure it beside miaotui on the same machine and files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miaotui.loaders.model_store import cache_dir  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-bench", "llama-server", "llama-quantize", "llama-perplexity", "llama-imatrix")


def _has_tools(bin_dir: Path) -> bool:
    return all((bin_dir / tool).is_file() for tool in TOOLS)


def cache_root() -> Path:
    return cache_dir() / "llama.cpp" / SDIST.split("==")[1]


def llama_cpp_source() -> Path:
    """llama.cpp's source tree (its convert_hf_to_gguf.py, its C++), from the cached sdist,
    downloaded from PyPI (pip) and unpacked on first use."""
    root = cache_root()
    found = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp: downloading the {SDIST} sdist (its llama.cpp sources) into {root}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", str(root)], check=True)
    archive = next(root.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))


def llama_cpp_bin(bin_dir: str | None = None) -> Path:
    """The directory holding llama-bench, llama-server, llama-quantize, llama-perplexity and llama-imatrix: the
    one given (or $LLAMA_CPP_BIN), else the cached build, built now if missing."""
    given = bin_dir or os.environ.get("LLAMA_CPP_BIN")
    if given:
        if not _has_tools(Path(given)):
            raise SystemExit(f"{given} lacks one of {', '.join(TOOLS)}")
        return Path(given)
    root = cache_root()
    built = root / "build" / "bin"
    if _has_tools(built):
        return built
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama.cpp needs {tool}; or pass --llama-cpp-bin DIR")
    source = llama_cpp_source()
    print("llama.cpp: configuring and building (about 10 minutes on 2 cores); the build is cached", flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    if not _has_tools(built):
        raise SystemExit(f"the llama.cpp build in {root / 'build'} did not produce {', '.join(TOOLS)}")
    return built
