"""Quantized checkpoints that travel: miaotui's integer models written in llm-compressor's format
(compressed-tensors) load in transformers with the same logits and back in miaotui with the same
codes; GPTQ (AutoGPTQ layout, act-order flag, v1 zero offset) and AWQ (GEMM layout) checkpoints,
packed here by the formats' own rules, load straight into QuantLinear without a float matrix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from miaotui.compress.calibration import load_calibration
from miaotui.compress.quantize.apply import quantize_model
from miaotui.errors import MiaotuiError
from miaotui.layers.quant_formats import QuantFormat, QuantizedTensor
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.hf_export import export_compressed_tensors
from miaotui.loaders.load import load_model
from tests.tiny_models import write_hf_dir

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
DENSE = ["llama", "qwen3", "mistral_window", "gemma2", "gemma3"]


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS, torch.arange(IDS.shape[1])[None]).float()


def _transformers_logits(directory: Path) -> torch.Tensor:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.inference_mode():
        return model(IDS).logits.float()


def _dequantized_reference_logits(src: Path, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers running src's checkpoint with `weights` (module name -> [N, K]) put in place."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for module, w in weights.items():
            ref.get_submodule(module).weight.copy_(w)
        return ref(IDS).logits


def _quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """K = 192 rows: groups of 128 end in a short one (as SmolLM2's 576 = 4 x 128 + 64)."""
    return write_hf_dir(tmp_path_factory.mktemp("wide"), hidden_size=192, intermediate_size=384, tie=False, seed=5)


def test_gptq_g128_export_loads_in_transformers_with_the_same_logits(wide_dir, calib_text, tmp_path):
    lm = load_model(wide_dir, torch.float32)
    calib = load_calibration(calib_text, lm.tokenizer, samples=8, seq_len=64)
    quantize_model(lm.model, "gptq", QuantFormat(4, 128, True), calib)
    out = export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / "ct", dtype="float32")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    groups = {g["weights"]["group_size"] for g in qcfg["config_groups"].values()}
    assert groups == {64, 128}  # 192 columns: 64-wide groups holding the 128-groups' scales twice
    ours, theirs = _logits(lm.model), _transformers_logits(out)
    assert (ours - theirs).abs().max() < 1e-3
    # and back into miaotui: the same codes, no float matrix on the way
    back = load_model(out, torch.float32)
    for name, layer in _quant_layers(lm.model).items():
        other = _quant_layers(back.model)[name]
        assert torch.equal(layer.dequantized_weight(), other.dequantized_weight()), name
    # (same weights; 64-wide groups take another kernel, whose int8 activation rounding differs slightly)
    assert (_logits(back.model) - ours).abs().max() < 1e-3


@pytest.mark.parametrize("name", DENSE)
def test_each_dense_family_exports_int4_that_transformers_runs(family_dir, tmp_path, name):
    lm = load_model(family_dir(name), torch.float32)
    quantize_model(lm.model, "rtn", QuantFormat(4, 32, True))
    out = export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / name, dtype="float32")
    assert (_logits(lm.model) - _transformers_logits(out)).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "mixtral", "gemma3"])
@pytest.mark.parametrize("fmt,act", [(QuantFormat(4, 32, True), False),
                                     (QuantFormat(4, 32, False, integer_zero=True), False),
                                     (QuantFormat(8, -1, True), True)],
                         ids=["w4-sym", "w4-asym", "w8a8"])
def test_round_trip_keeps_codes_and_logits(family_dir, tmp_path, name, fmt, act, monkeypatch):
    lm = load_model(family_dir(name), torch.float32)
    quantize_model(lm.model, "rtn", fmt, act_quant=act)
    out = export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / "ct", dtype="float32")

    def no_float_copy(self, dtype=torch.float32):
        raise AssertionError("a quantized checkpoint was dequantized while loading")
    monkeypatch.setattr(QuantizedTensor, "dequantize", no_float_copy)
    back = load_model(out, torch.float32)
    monkeypatch.undo()
    ours, theirs = _quant_layers(lm.model), _quant_layers(back.model)
    assert set(ours) == set(theirs) and ours
    for key, layer in ours.items():
        assert theirs[key].act_quant == act
        assert torch.equal(layer.dequantized_weight(), theirs[key].dequantized_weight()), key
    assert torch.allclose(_logits(back.model), _logits(lm.model), atol=1e-5)


def test_asymmetric_zero_points_are_what_compressed_tensors_decompresses(family_dir, tmp_path):
    """transformers cannot load asymmetric pack-quantized files with this compressed-tensors release
    (its loader expects unpacked zero points while the compressor packs them); the library's own
    decompressor reads ours back to the weights miaotui holds."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    lm = load_model(family_dir("llama"), torch.float32)
    quantize_model(lm.model, "rtn", QuantFormat(4, 32, False, integer_zero=True))
    out = export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / "ct", dtype="float32")
    scheme = QuantizationScheme(**json.loads((out / "config.json").read_text())["quantization_config"]
                                ["config_groups"]["group_0"])
    state = load_file(out / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj."
    local = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(weight, lm.model.layers[1].mlp.down_proj.dequantized_weight())


def test_real_valued_zero_points_are_refused_in_one_line(family_dir, tmp_path):
    lm = load_model(family_dir("llama"), torch.float32)
    quantize_model(lm.model, "rtn", QuantFormat(4, 32, False))  # GGUF Q4_1-style zero points
    with pytest.raises(MiaotuiError, match="real-valued zero points"):
        export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


# -- GPTQ and AWQ checkpoints, packed by their formats' rules -------------------------------------

def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] codes -> int32 [K*bits/32, N], 32/bits codes per word along K, lowest bits first (GPTQ)."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(-1, per, codes.shape[1])
    out = np.zeros((c.shape[0], c.shape[2]), dtype=np.uint32)
    for i in range(per):
        out |= c[:, i, :] << (bits * i)
    return out.view(np.int32)


def _pack_cols(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, C] codes -> int32 [R, C*bits/32] along C; order: which column each field holds (AWQ)."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    if order is not None:
        c = c[..., list(order)]
    out = np.zeros(c.shape[:2], dtype=np.uint32)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out.view(np.int32)


def _write_quantized_checkpoint(src: Path, out: Path, method: str, symmetric: bool, act_order: bool = False
                                ) -> dict[str, torch.Tensor]:
    """A GPTQ / AWQ checkpoint of src's weights at 4 bits in groups of 32 (min-max codes), written the
    way AutoGPTQ and AutoAWQ lay them out; -> the dequantized weights it holds, by the formats' formulas."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    state, new, expected = load_file(src / "model.safetensors"), {}, {}
    for name, w in state.items():
        if not (name.endswith("proj.weight") and ".layers." in name):
            new[name] = w
            continue
        module = name.removesuffix(".weight")
        n, k = w.shape
        # act-order: GPTQ visits columns by decreasing Hessian diagonal and groups them in that order
        order = torch.randperm(k, generator=torch.Generator().manual_seed(len(new))) if act_order else torch.arange(k)
        g = w.float()[:, order].reshape(n, k // 32, 32)
        if symmetric:  # GPTQ's symmetric: unsigned codes around a zero of 8
            scale = (g.abs().amax(-1) / 7).clamp(min=1e-8)
            zero = torch.full_like(scale, 8.0)
        else:
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(0, 15)
        scale = scale.half().float()  # (the files keep float16 scales)
        held = torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15).reshape(n, k)
        codes, g_idx = torch.empty_like(held), torch.empty(k, dtype=torch.int32)
        codes[:, order], g_idx[order] = held, (torch.arange(k) // 32).to(torch.int32)  # the weight's column order
        expected[module] = (codes - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
        q = codes.numpy().astype(np.uint32)  # [N, K]
        z = zero.numpy().astype(np.uint32)  # [N, G]
        if method == "gptq":
            new[module + ".qweight"] = torch.from_numpy(_pack_rows(q.T, 4))
            new[module + ".qzeros"] = torch.from_numpy(_pack_cols(z.T - 1, 4))  # v1: zero - 1
            new[module + ".scales"] = scale.t().contiguous().half()
            new[module + ".g_idx"] = g_idx
        else:
            new[module + ".qweight"] = torch.from_numpy(_pack_cols(q.T, 4, (0, 2, 4, 6, 1, 3, 5, 7)))
            new[module + ".qzeros"] = torch.from_numpy(_pack_cols(z.T, 4, (0, 2, 4, 6, 1, 3, 5, 7)))
            new[module + ".scales"] = scale.t().contiguous().half()
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": symmetric,
                                     "desc_act": act_order, "checkpoint_format": "gptq"} if method == "gptq" else \
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("method,symmetric", [("gptq", True), ("gptq", False), ("awq", False)])
def test_gptq_and_awq_checkpoints_load_into_quantlinear(family_dir, tmp_path, method, symmetric):

    src = family_dir("llama")
    expected = _write_quantized_checkpoint(src, tmp_path / method, method, symmetric)
    lm = load_model(tmp_path / method, torch.float32)
    layers = _quant_layers(lm.model)
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of 2 layers
    for i in range(2):
        qkv = torch.cat([expected[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"])
        assert torch.allclose(layers[f"layers.{i}.self_attn.qkv_proj"].dequantized_weight(), qkv, atol=1e-6)
    want = _dequantized_reference_logits(src, expected)
    assert (_logits(lm.model) - want).abs().max() < 1e-3
    if symmetric:  # and on to compressed-tensors, its integer layers as they are (not through floats)
        from miaotui.cli import main

        assert main(["export", "-m", str(tmp_path / method), "--dtype", "float32", "-o", str(tmp_path / "ct")]) == 0
        qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
        assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
        back = load_model(tmp_path / "ct", torch.float32)
        for name, layer in layers.items():
            assert torch.equal(_quant_layers(back.model)[name].dequantized_weight(), layer.dequantized_weight())


def test_act_order_gptq_loads_with_its_groups(family_dir, tmp_path):
    """g_idx from GPTQ's act-order: the layer holds its columns by group and gathers its input so.
    compressed-tensors (0.20) has no act-order groups any more: the export says so in one line."""

    src = family_dir("llama")
    expected = _write_quantized_checkpoint(src, tmp_path / "gptq", "gptq", True, act_order=True)
    lm = load_model(tmp_path / "gptq", torch.float32)
    down = lm.model.layers[1].mlp.down_proj
    assert down.input_order is not None
    assert torch.allclose(down.dequantized_weight(), expected["model.layers.1.mlp.down_proj"], atol=1e-6)
    want = _dequantized_reference_logits(src, expected)
    assert (_logits(lm.model) - want).abs().max() < 1e-3
    with pytest.raises(MiaotuiError, match="activation-ordered groups"):
        export_compressed_tensors(lm.model, lm.tokenizer, tmp_path / "ct", dtype="float32")
    # the serving engine (bf16, the native kernels, fused decode where a layer allows it) agrees
    from miaotui import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fast = LLM(str(tmp_path / "gptq"), dtype="bfloat16").generate([IDS[0].tolist()], greedy)[0].outputs[0]
    exact = LLM(str(tmp_path / "gptq"), dtype="float32").generate([IDS[0].tolist()], greedy)[0].outputs[0]
    assert fast.token_ids[:4] == exact.token_ids[:4]


def test_a_g_idx_with_uneven_groups_is_one_line(family_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "gptq"
    _write_quantized_checkpoint(family_dir("llama"), out, "gptq", True, act_order=True)
    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.g_idx"
    state[name][:3] = 0  # group 0 now has more than 32 columns
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(MiaotuiError, match="does not give every group 32 columns"):
        load_model(out, torch.float32)


def test_unknown_quant_method_is_one_line(family_dir, tmp_path):
    import shutil

    out = tmp_path / "odd"
    shutil.copytree(family_dir("llama"), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MiaotuiError, match="'bitsandbytes' is not supported"):
        load_model(out, torch.float32)


def test_cli_quantize_then_export_then_run(family_dir, tmp_path, capsys):
    from miaotui.cli import main

    src = family_dir("qwen3")
    assert main(["quantize", "-m", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--integer-zero", "-o", str(tmp_path / "q")]) in (0, None)
    assert main(["export", "-m", str(tmp_path / "q"), "-o", str(tmp_path / "ct")]) in (0, None)
    assert "compressed-tensors" in capsys.readouterr().out
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    q, ct = load_model(tmp_path / "q", torch.float32), load_model(tmp_path / "ct", torch.float32)
    for name, layer in _quant_layers(q.model).items():  # bfloat16 scales: within their rounding
        other = _quant_layers(ct.model)[name]
        assert torch.equal(layer.codes(), other.codes())
        assert torch.allclose(layer.scale, other.scale, rtol=2 ** -8)
    assert main(["generate", "-m", str(tmp_path / "ct"), "--max-tokens", "4", "-p", "Hello"]) in (0, None)


def test_a_2_4_pruned_model_keeps_its_pattern_through_compressed_tensors(family_dir, tmp_path):
    """compressed-tensors 0.20 writes no sparse format any more (its ModelCompressor saves an empty
    sparsity_config; llm-compressor 0.14 warns that sparse compression is no longer supported): a
    2:4-pruned model travels as its dense or pack-quantized tensors, zeros in place. Symmetric int4
    maps 0 to code 0, so after RTN the transformers-side weights still hold 2 zeros in every 4."""
    from miaotui.cli import main

    src = family_dir("llama")
    assert main(["prune", "-m", str(src), "--method", "magnitude", "--pattern", "2:4", "-o",
                 str(tmp_path / "p")]) in (0, None)
    assert main(["quantize", "-m", str(tmp_path / "p"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--symmetric", "-o", str(tmp_path / "q")]) in (0, None)
    for model, out in ((tmp_path / "p", tmp_path / "dense"), (tmp_path / "q", tmp_path / "packed")):
        assert main(["export", "-m", str(model), "--dtype", "float32", "-o", str(out)]) in (0, None)
        exported = load_model(out, torch.float32).model  # read back through the compressed-tensors library
        weights = [m.dequantized_weight() if isinstance(m, QuantLinear) else m.weight
                   for n, m in exported.named_modules() if n.startswith("layers.") and hasattr(m, "in_features")]
        assert weights
        for weight in weights:
            assert bool(((weight.detach().reshape(-1, 4) == 0).sum(-1) >= 2).all())
        assert torch.allclose(_transformers_logits(out), _logits(load_model(model, torch.float32).model), atol=1e-3)
