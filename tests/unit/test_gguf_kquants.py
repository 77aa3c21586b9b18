"""K-quant and legacy GGUF encoders (byte layouts as gguf's own dequantizer reads them, rounding
weighted by importance), the per-tensor types of the named mixes as llama-quantize picks them, and
export-gguf with an importance matrix from calibration."""

from __future__ import annotations

import gguf
import pytest
import torch

from miaotui.cli import main
from miaotui.loaders.gguf_export import export_gguf
from miaotui.loaders.gguf_kquants import encode
from miaotui.loaders.gguf_mixes import EXPORT_TYPES, matrix_type, use_more_bits
from miaotui.loaders.load import load_model
from tests.tiny_models import write_hf_dir

T = gguf.GGMLQuantizationType
# relative RMS error ceilings on Gaussian weights with uneven column scales (each about 1.3x what
# the encoder reaches; a wrong bit layout is off by orders of magnitude)
CEILING = {T.Q8_0: 0.008, T.Q6_K: 0.025, T.Q5_K: 0.05, T.Q5_1: 0.05, T.Q5_0: 0.06, T.Q4_K: 0.1, T.Q4_1: 0.1,
           T.Q4_0: 0.115, T.Q3_K: 0.2}


def _matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 512, generator=g) * (0.5 + torch.rand(512, generator=g))


def _rel(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    w = torch.ones_like(a) if weight is None else weight.expand_as(a)
    return float(((a - b).pow(2) * w).sum().sqrt() / (b.pow(2) * w).sum().sqrt())


@pytest.mark.parametrize("qtype", list(CEILING), ids=lambda t: t.name)
def test_encoded_blocks_decode_with_ggufs_reader(qtype):
    w = _matrix()
    raw = encode(w, qtype)
    assert raw.shape == (32, 512 // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    back = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(w.shape)
    assert _rel(back, w) < CEILING[qtype]
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # no worse than gguf's plain rounding
        plain = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        assert _rel(back, w) <= _rel(plain, w)


@pytest.mark.parametrize("qtype", [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q5_1], ids=lambda t: t.name)
def test_importance_moves_the_error_off_the_important_columns(qtype):
    w = _matrix()
    importance = torch.ones(512)
    importance[::8] = 50.0  # one column in eight carries most of the input energy
    plain = torch.from_numpy(gguf.quants.dequantize(encode(w, qtype), qtype)).reshape(w.shape)
    weighted = torch.from_numpy(gguf.quants.dequantize(encode(w, qtype, importance), qtype)).reshape(w.shape)
    assert _rel(weighted, w, importance) < 0.97 * _rel(plain, w, importance)


def test_q4_k_m_picks_types_as_llama_quantize():
    kind, n = EXPORT_TYPES["q4_k_m"], 8
    bumped = [i for i in range(n) if use_more_bits(i, n)]
    assert bumped == [0, 3, 6, 7]
    for i in range(n):
        more = T.Q6_K if i in bumped else T.Q4_K
        assert matrix_type(kind, "attn_v", i, n, 256, 0, True) == more
        assert matrix_type(kind, "ffn_down", i, n, 512, 0, True) == more
        assert matrix_type(kind, "attn_q", i, n, 256, 0, True) == T.Q4_K
        assert matrix_type(kind, "ffn_up", i, n, 576, 0, True) == T.Q5_0  # 576 is no whole 256-blocks
        assert matrix_type(kind, "attn_v", i, n, 576, 0, True) == (T.Q8_0 if i in bumped else T.Q5_0)
    assert matrix_type(kind, "output", 0, n, 256, 0, False) == T.Q6_K
    assert matrix_type(kind, "token_embd", 0, n, 576, 0, True) == T.Q8_0  # tied: the head's rule
    assert matrix_type(kind, "token_embd", 0, n, 256, 0, False) == T.Q4_K
    assert matrix_type(EXPORT_TYPES["q3_k_m"], "attn_v", 1, n, 256, 0, True) == T.Q5_K
    assert matrix_type(EXPORT_TYPES["q3_k_m"], "ffn_down", 5, n, 256, 0, True) == T.Q4_K
    assert matrix_type(EXPORT_TYPES["q3_k_m"], "attn_q", 5, n, 576, 0, True) == T.Q4_0
    assert matrix_type(EXPORT_TYPES["q5_k_m"], "ffn_up", 5, n, 576, 0, True) == T.Q5_1
    assert matrix_type(EXPORT_TYPES["q4_k_m"], "attn_v", 3, n, 256, 8, True) == T.Q8_0  # 8 experts


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Rows of 256 and 768 values (whole k-quant blocks), 8 layers: every choice of the mixes shows."""
    return write_hf_dir(tmp_path_factory.mktemp("kq"), hidden_size=256, intermediate_size=768,
                        num_hidden_layers=8, tie=False, seed=2)


def test_mixed_exports_load_and_compute_the_model(wide_dir, tmp_path):
    src = load_model(wide_dir, torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11] * 8])
    pos = torch.arange(ids.shape[1])[None]
    ref = src.model(ids, pos)
    errors = {}
    for type_name in ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m"):
        path = export_gguf(src.model, src.tokenizer, tmp_path / f"{type_name}.gguf", type_name)
        reader = gguf.GGUFReader(path)
        types = {t.name: t.tensor_type for t in reader.tensors}
        if type_name == "q4_k_m":
            assert types["blk.0.attn_v.weight"] == T.Q6_K and types["blk.1.attn_v.weight"] == T.Q4_K
            assert types["blk.3.ffn_down.weight"] == T.Q6_K and types["output.weight"] == T.Q6_K
        back = load_model(path, torch.float32)
        # the loaded weights are exactly what gguf's reader decodes from the file (float32: the float path)
        blk = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
        decoded = torch.from_numpy(gguf.quants.dequantize(blk.data, blk.tensor_type)).reshape(256, 768)
        assert torch.equal(back.model.layers[2].mlp.down_proj.weight, decoded)
        errors[type_name] = float((back.model(ids, pos) - ref).norm() / ref.norm())
    # fewer bits, more error; and none far off (8 random layers compound each one's rounding)
    assert errors["q6_k"] < errors["q5_k_m"] < errors["q4_k_m"] < errors["q3_k_m"] < 0.5, errors


def test_cli_export_with_an_importance_matrix(wide_dir, tmp_path, calib_text, capsys):
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "imatrix.gguf"
    assert main(["export-gguf", "-m", str(wide_dir), "--type", "q4_k_m", "-o", str(plain)]) == 0
    assert main(["export-gguf", "-m", str(wide_dir), "--type", "q4_k_m", "--imatrix", "--calib-file",
                 str(calib_text), "--calib-samples", "4", "--calib-seq-len", "64", "-o", str(weighted)]) == 0
    a = {t.name: t.data.tobytes() for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: t.data.tobytes() for t in gguf.GGUFReader(weighted).tensors}
    assert a.keys() == b.keys()
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]  # importance changed the rounding
    assert a["blk.0.attn_norm.weight"] == b["blk.0.attn_norm.weight"]


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q3_K, T.Q5_0, T.Q4_1], ids=lambda t: t.name)
def test_gptq_onto_a_grid_writes_blocks_that_decode_to_its_weights(qtype):
    from miaotui.compress.quantize.gguf_gptq import gptq_gguf

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 512, generator=g)
    x = torch.randn(2048, 512, generator=g) * (0.3 + 2 * torch.rand(512, generator=g))  # uneven input energy
    x[:, 1:] += 0.5 * x[:, :-1]  # correlated columns: where GPTQ's error feedback helps
    hessian = 2 * x.t() @ x / x.shape[0]
    data, deq = gptq_gguf(w, hessian, qtype)
    decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(w.shape)
    assert torch.equal(decoded, deq)  # the bytes hold exactly the weights GPTQ settled on
    plain = torch.from_numpy(gguf.quants.dequantize(encode(w, qtype, torch.diag(hessian)), qtype)).reshape(w.shape)

    def output_error(v: torch.Tensor) -> float:
        return float((x @ (v - w).t()).pow(2).mean())
    assert output_error(deq) < 0.9 * output_error(plain)  # GPTQ lowers the layer's output error


def test_cli_export_gptq_is_closer_to_the_float_model(wide_dir, tmp_path, calib_text):
    src = load_model(wide_dir, torch.float32)
    ids = torch.tensor([src.tokenizer.encode(calib_text.read_text()[:3000])[:128]])
    pos = torch.arange(ids.shape[1])[None]
    ref = torch.log_softmax(src.model(ids, pos), -1)
    kl = {}
    for flags in ([], ["--gptq"]):
        out = tmp_path / f"m{len(flags)}.gguf"
        assert main(["export-gguf", "-m", str(wide_dir), "--type", "q4_k_m", *flags, "--calib-file", str(calib_text),
                     "--calib-samples", "8", "--calib-seq-len", "128", "-o", str(out)]) == 0
        got = torch.log_softmax(load_model(out, torch.float32).model(ids, pos), -1)
        kl[len(flags)] = float((ref.exp() * (ref - got)).sum(-1).mean())
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_v.weight"] == T.Q6_K and types["blk.1.attn_q.weight"] == T.Q4_K
    assert kl[1] < kl[0]
