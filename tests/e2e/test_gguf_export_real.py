"""GGUF export of the real model: reloads with the same tokenizer and still answers; and, when
llama-cpp-python is installed, llama.cpp itself runs the file (optional peer check)."""

import importlib.util

import pytest

from miaotui import LLM, SamplingParams
from miaotui.loaders.gguf_export import export_gguf

pytestmark = pytest.mark.e2e
TEXT = "Numbers 1234 and 你好 😀 — the quick brown fox."


@pytest.fixture(scope="module")
def exported(real_llm, tmp_path_factory):
    return export_gguf(real_llm.model, real_llm.tokenizer, tmp_path_factory.mktemp("export") / "smol-q8_0.gguf",
                       "q8_0")


def test_exported_q8_0_reloads_and_answers(real_llm, exported):
    back = LLM(str(exported), dtype="float32")
    assert back.tokenizer.encode(TEXT) == real_llm.tokenizer.encode(TEXT)
    out = back.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    assert "Paris" in out
    assert exported.stat().st_size < 160 * 2**20


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_runs_the_exported_file(real_llm, exported):
    import llama_cpp

    original = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():  # weight repacking crashed (SIGILL) on an AMX Xeon; this test checks the file, not speed
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repack
    try:
        llm = llama_cpp.Llama(str(exported), n_ctx=256, verbose=False)
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == real_llm.tokenizer.encode(TEXT)
        text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        assert "Paris" in text
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original

