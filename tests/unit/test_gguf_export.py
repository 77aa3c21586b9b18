"""GGUF export: the file reads back (gguf package and our loader) and computes the same model."""

import gguf
import pytest
import torch

from miaotui.cli import main
from miaotui.compress.quantize.apply import quantize_model
from miaotui.layers.quant_formats import QuantFormat
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.gguf_export import export_gguf
from miaotui.loaders.load import load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _logits(loaded):
    return loaded.model(IDS, torch.arange(IDS.shape[1])[None])


@pytest.mark.parametrize("type_name,tolerance", [("f32", 1e-5), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 3e-2),
                                                 ("q4_0", 0.3), ("q4_1", 0.3)])
def test_export_reads_back_and_matches(tiny_hf_dir, tmp_path, type_name, tolerance):
    src = load_model(tiny_hf_dir, torch.float32)
    path = export_gguf(src.model, src.tokenizer, tmp_path / f"m-{type_name}.gguf", type_name)
    reader = gguf.GGUFReader(path)
    q_type = next(t.tensor_type for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q_type.name.lower() == type_name
    back = load_model(path, torch.float32)
    ref = _logits(src)
    assert float((_logits(back) - ref).norm() / ref.norm()) < tolerance
    text = "Hello, world! 你好 😀 <|im_start|>"
    assert back.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert back.tokenizer.chat_template == src.tokenizer.chat_template


def test_export_of_a_quantized_model(tiny_hf_dir, tmp_path):
    src = load_model(tiny_hf_dir, torch.float32)
    quantize_model(src.model, "rtn", QuantFormat(8, -1, True))
    path = export_gguf(src.model, src.tokenizer, tmp_path / "q.gguf", "f32")
    back = load_model(path, torch.float32)
    # The file holds the dequantized weights exactly ...
    quantized = {n: m for n, m in src.model.named_modules() if isinstance(m, QuantLinear)}
    dense = dict(back.model.named_modules())
    assert quantized
    for name, module in quantized.items():
        torch.testing.assert_close(dense[name].weight, module.dequantized_weight(), rtol=0, atol=0)
    # ... and computes the same model; the quantized source's few-row kernels take int8-quantized
    # activations (as llama.cpp's do), so the logits agree to that precision, not to float rounding.
    ref = _logits(src)
    assert float((_logits(back) - ref).norm() / ref.norm()) < 1e-2


def test_cli_export_gguf(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", "-m", str(tiny_hf_dir), "--type", "q8_0", "-o", str(out)]) == 0
    assert out.is_file() and not out.with_suffix(".gguf.partial").exists()
    with pytest.raises(SystemExit):
        main(["export-gguf", "-m", str(tiny_hf_dir), "--type", "q2_k", "-o", str(out)])
