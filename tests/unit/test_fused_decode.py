"""The decode step of the decoder layers as one native op (models/fused_decode.py): it runs for bf16 decode
steps where every part of the layer has a native kernel, and gives the bits of the module path."""

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.cli import main
from miaotui.kernels import native_op
from miaotui.layers.kernel_choice import KernelLog, q_tiles_fits, this_cpu
from miaotui.models.fused_decode import FusedDecode
from miaotui.models.transformer import Transformer
from tests.tiny_models import write_hf_dir

pytestmark = pytest.mark.skipif(
    native_op("decode_layers") is None or not this_cpu().avx512_bf16 or not q_tiles_fits(this_cpu()),
    reason="the fused decode step needs the native kernels, AVX512-BF16 and VNNI")

PROMPTS = [[5, 17, 42, 99, 7, 3, 11], [8, 9], [30, 31, 32, 33]]
QUANTIZE = {"bf16": None, "int4-g32-sym": ["--bits", "4", "--group-size", "32", "--symmetric"],
            "int8-per-channel": ["--bits", "8", "--group-size", "-1", "--symmetric"],
            "int8-g128-asym": ["--bits", "8", "--group-size", "128"]}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def wide_dir(request, tmp_path_factory):
    # 32-wide heads (the native attention's block), a qkv bias with qwen2, q/k head norms with qwen3
    return write_hf_dir(tmp_path_factory.mktemp(f"wide-{request.param}"), arch=request.param, hidden_size=128,
                        intermediate_size=256)


def _hidden_per_step(llm: LLM, monkeypatch, fused: bool, prompts=PROMPTS) -> tuple[list[torch.Tensor], list, dict]:
    """The final hidden states of every engine step, the outputs, and the kernels that ran."""
    seen = []
    logits = Transformer.logits

    def record(self, hidden):
        seen.append(hidden.clone())
        return logits(self, hidden)

    monkeypatch.setattr(Transformer, "logits", record)
    if not fused:
        monkeypatch.setattr(FusedDecode, "step_fits", lambda *args: False)
    with KernelLog() as log:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    monkeypatch.undo()
    return seen, [o.outputs[0].token_ids for o in outs], log.calls


def _assert_fused_gives_module_bits(llm: LLM, monkeypatch, prompts) -> None:
    """Decode steps ran fused, with the module path's tokens and hidden states, bit for bit."""
    fused_hidden, fused_ids, fused_kernels = _hidden_per_step(llm, monkeypatch, True, prompts)
    module_hidden, module_ids, _ = _hidden_per_step(llm, monkeypatch, False, prompts)
    assert fused_kernels.get("decoder layer fused", 0) >= 2 * 5
    assert fused_ids == module_ids
    for a, b in zip(fused_hidden, module_hidden, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weights", list(QUANTIZE), ids=str)
def test_fused_decode_step_gives_the_module_path_bits(wide_dir, weights, tmp_path, monkeypatch):
    path = wide_dir
    if QUANTIZE[weights] is not None:
        path = tmp_path / weights
        assert main(["quantize", "-m", str(wide_dir), "--method", "rtn", *QUANTIZE[weights], "-o", str(path)]) == 0
    llm = LLM(str(path), dtype="bfloat16")
    fused_hidden, fused_ids, fused_kernels = _hidden_per_step(llm, monkeypatch, fused=True)
    module_hidden, module_ids, module_kernels = _hidden_per_step(llm, monkeypatch, fused=False)
    # decode steps (3 rows, then 1-3 as requests end) ran fused, every layer; prefill did not
    assert fused_kernels.get("decoder layer fused", 0) >= 2 * 5
    assert "decoder layer fused" not in module_kernels
    assert fused_ids == module_ids
    assert len(fused_hidden) == len(module_hidden)
    for a, b in zip(fused_hidden, module_hidden, strict=True):
        assert torch.equal(a, b)


def test_a_changed_layer_leaves_the_fused_run(wide_dir):
    """The step's plans are compared with each layer's layouts every step: a layer whose layout goes
    (or is replaced) runs through its modules from the next step on, and the others stay fused."""
    llm = LLM(str(wide_dir), dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with KernelLog() as before:
        expected = llm.generate(PROMPTS[:1], params)[0].outputs[0].token_ids
    layers = llm.model.layers
    fused_steps = before.calls["decoder layer fused"] // len(layers)
    assert fused_steps >= 2
    down = layers[0].mlp.down_proj
    tiles, down.tiles = down.tiles, None  # the bf16 tile layout gone: no native few-row kernel
    with KernelLog() as after:
        again = llm.generate(PROMPTS[:1], params)[0].outputs[0].token_ids
    assert after.calls["decoder layer fused"] == fused_steps * (len(layers) - 1)
    assert again == expected  # the module path gives the same bits
    down.tiles = tiles
    with KernelLog() as restored:
        llm.generate(PROMPTS[:1], params)
    assert restored.calls["decoder layer fused"] == fused_steps * len(layers)


def test_long_contexts_split_attention_over_the_threads_with_the_same_bits(tmp_path, monkeypatch):
    """Past ~2k keys x heads the step's attention tasks spread over the threads inside the one
    parallel region: still the module path's bits."""
    path = write_hf_dir(tmp_path / "long", hidden_size=128, intermediate_size=256, max_position_embeddings=1024)
    # no prefix caching: the second run must prefill as the first did
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, enable_prefix_caching=False)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (length,), generator=generator).tolist() for length in (700, 610, 650)]
    _assert_fused_gives_module_bits(llm, monkeypatch, prompts)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_fused_decode_step_over_a_quantized_cache_gives_the_module_path_bits(wide_dir, kv_cache_dtype, monkeypatch):
    """One-byte codes and scales in the paged cache (kernels/kv_codes.cpp): the fused step writes
    and reads them with the bits of the module path, at short contexts and at long ones (attention
    tasks over the threads)."""
    llm = LLM(str(wide_dir), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    assert llm.engine.cache.keys[0].element_size() == 1
    generator = torch.Generator().manual_seed(1)
    for prompts in (PROMPTS, [torch.randint(3, 300, (length,), generator=generator).tolist()
                                     for length in (240, 200, 220, 180)]):
        _assert_fused_gives_module_bits(llm, monkeypatch, prompts)
