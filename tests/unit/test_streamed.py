"""Compression and export one decoder layer at a time (compress/streamed.py): the same results as
on a model loaded whole, with at most one float32 layer in memory."""

import gguf
import pytest
import torch
from safetensors.torch import load_file

from miaotui.cli import main
from miaotui.compress.calibration import load_calibration
from miaotui.compress.prune.unstructured import prune_model
from miaotui.compress.quantize.apply import quantize_model
from miaotui.compress.streamed import LayerStore, open_streamed
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat
from miaotui.loaders.gguf_export import export_gguf
from miaotui.loaders.load import load_model
from tests.tiny_models import write_hf_dir


def _float32_layers(model) -> int:
    return sum(any(isinstance(m, Linear) and m.weight.dtype == torch.float32 and not m.weight.is_meta
                   for m in layer.modules()) for layer in model.layers)


@pytest.fixture
def bf16_hf_dir(tmp_path):
    """A tiny checkpoint stored in bfloat16, as real ones are: finished layers are kept in bf16."""
    path = write_hf_dir(tmp_path / "hf", num_hidden_layers=4)
    state = load_file(path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path / "model.safetensors", {"format": "pt"})
    return path


def _watch_loads(model, seen: list[int]):
    store: LayerStore = model.layer_store
    load = store.load

    def watched(i):
        seen.append(_float32_layers(model))  # float32 layers alive when the next one is read
        return load(i)

    store.load = watched


def test_layers_stay_in_the_checkpoint_until_read(bf16_hf_dir):
    model, _ = open_streamed(str(bf16_hf_dir))
    assert all(p.is_meta for p in model.layers.parameters())
    assert not model.embed_tokens.weight.is_meta and model.embed_tokens.weight.dtype == torch.float32
    assert model.layer_store.keep_dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant"])
def test_streamed_quantization_equals_whole_model(bf16_hf_dir, calib_text, method):
    fmt = QuantFormat(8, -1, True) if method == "smoothquant" else QuantFormat(4, 32, False)
    whole = load_model(bf16_hf_dir, torch.float32)
    streamed, tokenizer = open_streamed(str(bf16_hf_dir))
    streamed.layer_store.calibration_dtype = torch.float32  # as the whole model calibrates (bf16: below)
    calib = load_calibration(calib_text, tokenizer, samples=4, seq_len=32) if method != "rtn" else None
    seen: list[int] = []
    _watch_loads(streamed, seen)
    rec_whole = quantize_model(whole.model, method, fmt, calib)
    rec_streamed = quantize_model(streamed, method, fmt, calib)
    assert rec_whole.layers == rec_streamed.layers
    assert max(seen) == 0  # each layer finished (packed, bf16 norms) before the next is read
    a, b = whole.model.state_dict(), streamed.state_dict()
    for name in a:
        if a[name].dtype in (torch.uint8, torch.int8):
            assert torch.equal(a[name], b[name]), name
    assert streamed.layers[0].input_layernorm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_streamed_pruning_equals_whole_model(bf16_hf_dir, calib_text, method):
    whole = load_model(bf16_hf_dir, torch.float32)
    streamed, tokenizer = open_streamed(str(bf16_hf_dir))
    streamed.layer_store.calibration_dtype = torch.float32
    calib = load_calibration(calib_text, tokenizer, samples=4, seq_len=32)
    seen: list[int] = []
    _watch_loads(streamed, seen)
    a = prune_model(whole.model, method, 0.5, calib=calib, owl=method == "wanda")
    b = prune_model(streamed, method, 0.5, calib=calib, owl=method == "wanda")
    assert max(seen) == 0
    assert a.layer_sparsity == b.layer_sparsity
    for name, value in a.modules.items():
        assert b.modules[name] == pytest.approx(value, abs=0.01)
        w_whole = whole.model.get_submodule(name).weight
        w_streamed = streamed.get_submodule(name).weight
        assert torch.equal(w_whole == 0, w_streamed == 0) or method == "sparsegpt", name


def test_a_bf16_checkpoint_calibrates_in_bf16_where_native(bf16_hf_dir, calib_text, tmp_path):
    from miaotui.runtime import cpu_has_fast_bf16

    streamed, tokenizer = open_streamed(str(bf16_hf_dir))
    want = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert streamed.layer_store.calibration_dtype == want
    calib = load_calibration(calib_text, tokenizer, samples=4, seq_len=32)
    rec = quantize_model(streamed, "gptq", QuantFormat(4, 32, False), calib)
    assert rec.calibration["compute_dtype"] == str(want).removeprefix("torch.")
    # as good as float32 calibration: the quantized model's logits as far from the float model's
    from miaotui.loaders.miaotui_dir import save_model

    whole = load_model(bf16_hf_dir, torch.float32)
    ids = torch.tensor([list(range(5, 69))])
    positions = torch.arange(ids.shape[1])[None]
    reference = whole.model(ids, positions)
    quantize_model(whole.model, "gptq", QuantFormat(4, 32, False), calib)
    saved = load_model(save_model(streamed, tokenizer, tmp_path / "s", rec.to_dict()), torch.float32)
    streamed_error = _error(saved.model(ids, positions), reference)
    assert streamed_error < 1.25 * _error(whole.model(ids, positions), reference) + 1e-3


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_whole_model_stage_checks_memory_first(bf16_hf_dir, monkeypatch):
    import miaotui.compress.streamed as streamed_module

    model, _ = open_streamed(str(bf16_hf_dir))
    monkeypatch.setattr(streamed_module, "available_bytes", lambda: 1000)
    with pytest.raises(MiaotuiError, match="needs the whole model in float32"):
        model.layer_store.load_all("distillation")
    assert all(p.is_meta for p in model.layers.parameters())


@pytest.mark.parametrize("type_name", ["f32", "q8_0", "q4_0"])
def test_streamed_export_is_the_same_file(tiny_hf_dir, tmp_path, type_name):
    whole = load_model(tiny_hf_dir, torch.float32)
    a = export_gguf(whole.model, whole.tokenizer, tmp_path / "whole.gguf", type_name)
    streamed, tokenizer = open_streamed(str(tiny_hf_dir))
    b = export_gguf(streamed, tokenizer, tmp_path / "streamed.gguf", type_name)
    assert a.read_bytes() == b.read_bytes()
    assert all(p.is_meta for p in streamed.layers.parameters())  # each layer dropped once written
    assert len(gguf.GGUFReader(b).tensors) == 2 + 9 * len(streamed.layers)


def test_cli_quantize_then_export_streams_a_saved_model(bf16_hf_dir, tmp_path, calib_text):
    out = tmp_path / "gptq"
    assert main(["quantize", "-m", str(bf16_hf_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib-file", str(calib_text), "--calib-samples", "4", "--calib-seq-len", "32",
                 "-o", str(out)]) == 0
    saved = load_file(out / "model.safetensors")
    assert saved["embed_tokens.weight"].dtype == torch.bfloat16  # the checkpoint's own float dtype
    assert saved["layers.0.mlp.down_proj.packed"].dtype == torch.uint8
    gguf_path = tmp_path / "gptq.gguf"
    assert main(["export-gguf", "-m", str(out), "--type", "q8_0", "-o", str(gguf_path)]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    positions = torch.arange(ids.shape[1])[None]
    ref = load_model(out, torch.float32).model(ids, positions)
    back = load_model(gguf_path, torch.float32).model(ids, positions)
    assert float((back - ref).norm() / ref.norm()) < 0.05


def test_calibration_stays_float32_for_float32_and_quantized_checkpoints(tiny_hf_dir, tiny_gguf, tmp_path):
    from tests.tiny_models import write_gguf_from_hf_dir

    for source in (tiny_hf_dir, tiny_gguf, write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "q8.gguf", quant={
            "weight": gguf.GGMLQuantizationType.Q8_0})):
        model, _ = open_streamed(str(source))
        assert model.layer_store.calibration_dtype == torch.float32, source
