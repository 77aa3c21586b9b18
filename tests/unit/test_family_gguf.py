"""Every family as GGUF: the tiny checkpoints converted by llama.cpp's own convert_hf_to_gguf.py
(from the llama-cpp-python sdist, fetched from PyPI once) load with the logits miaotui gives the
Hugging Face directory; export-gguf's files read back the same and load in llama.cpp (its cached
build, where there is one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miaotui.loaders.gguf_export import export_gguf
from miaotui.loaders.load import load_model
from tests.tiny_models import FAMILY_CONFIGS, WINDOW

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = sorted(FAMILY_CONFIGS)
# llama.cpp writes Mistral and Mixtral as 'llama', which has no sliding window: their files match
# the checkpoint only while a sequence fits in the window
NO_WINDOW_IN_GGUF = ("mistral_window", "mixtral")


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.llama_cpp import llama_cpp_source

    try:
        return llama_cpp_source()
    except (subprocess.CalledProcessError, OSError, StopIteration) as exc:
        pytest.skip(f"llama.cpp's sources (llama-cpp-python sdist) are unavailable: {exc}")


def _llama_bench() -> Path | None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.llama_cpp import cache_root

    tool = cache_root() / "build" / "bin" / "llama-bench"
    return tool if tool.is_file() else None


def _logits(model, n: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + n)[None] * 7 % 400
    with torch.inference_mode():
        return model(ids, torch.arange(n)[None])


def _length(name: str) -> int:
    return WINDOW if name in NO_WINDOW_IN_GGUF else 2 * WINDOW + 4


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_converted_file_gives_the_checkpoint_logits(family_dir, llama_cpp_source, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    done = subprocess.run([sys.executable, str(ROOT / "tests/convert_with_llama_cpp.py"), str(llama_cpp_source),
                           str(family_dir(name)), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from_hf, from_gguf = load_model(family_dir(name), torch.float32), load_model(out, torch.float32)
    assert from_gguf.config.architecture == from_hf.config.architecture or name == "mistral_window"
    torch.testing.assert_close(_logits(from_gguf.model, _length(name)), _logits(from_hf.model, _length(name)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_gguf_reads_back_and_loads_in_llama_cpp(family_dir, tmp_path, name):
    loaded = load_model(family_dir(name), torch.float32)
    expected = _logits(loaded.model, _length(name))
    for kind, atol in (("f32", 1e-4), ("q8_0", 0.1)):
        out = export_gguf(loaded.model, loaded.tokenizer, tmp_path / f"{name}-{kind}.gguf", kind)
        again = load_model(out, torch.float32)
        torch.testing.assert_close(_logits(again.model, _length(name)), expected, atol=atol, rtol=0)
        bench = _llama_bench()
        if bench is not None:  # (weight repacking off: on AMX Xeons llama.cpp's repacked Q8_0 path dies of SIGILL)
            run = subprocess.run([str(bench), "-m", str(out), "-p", "8", "-n", "4", "-r", "1", "-t", "1",
                                  "--repack", "0"], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-2000:]
