"""Quantization: formats and packing, kernels vs the dequantized reference, GPTQ, save/load, errors."""

import json

import pytest
import torch

from miaotui.cli import main
from miaotui.compress.calibration import load_calibration
from miaotui.compress.quantize.apply import quantize_model
from miaotui.compress.quantize.gptq import gptq_quantize_weight
from miaotui.errors import MiaotuiError
from miaotui.layers.kernel_choice import (
    Q_ROWS_MAX_ROWS,
    Q_TILES_MAX_ROWS,
    packed_kernel_max_rows,
    q_tiles_fits,
    this_cpu,
)
from miaotui.layers.quant_formats import (
    QuantFormat,
    compute_qparams,
    dequantize_codes,
    pack_codes,
    quantize_codes,
    unpack_codes,
)
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.load import load_model

FORMATS = [QuantFormat(8, -1, True), QuantFormat(4, 32, True), QuantFormat(4, 128, False), QuantFormat(3, 64, False),
           QuantFormat(2, 32, False), QuantFormat(2, 64, True, "ternary"), QuantFormat(2, 64, True, "binary")]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.kind}{f.bits}-g{f.group_size}-{f.symmetric}")
def test_codes_pack_round_trip_and_stay_in_range(fmt):
    w = torch.randn(48, 192)
    scale, zero = compute_qparams(w, fmt)
    codes = quantize_codes(w, scale, zero, fmt)
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    packed = pack_codes(codes, fmt)
    assert packed.shape == (48, 192 * fmt.storage_bits // 8)
    assert torch.equal(unpack_codes(packed, fmt), codes.to(torch.int16))


def test_quantization_error_shrinks_with_bits():
    w = torch.randn(64, 256)
    errors = [float((dequantize_codes(quantize_codes(w, *compute_qparams(w, f), f), *compute_qparams(w, f), f) - w)
                    .norm() / w.norm()) for f in (QuantFormat(8, 32, False), QuantFormat(4, 32, False),
                                                  QuantFormat(3, 32, False), QuantFormat(2, 32, False))]
    assert errors == sorted(errors) and errors[0] < 0.01 and errors[-1] < 0.6


def test_partial_last_group():
    fmt = QuantFormat(4, 128, False)
    w = torch.randn(8, 576)  # 576 = 4 x 128 + 64
    scale, zero = compute_qparams(w, fmt)
    assert scale.shape == (8, 5)
    back = dequantize_codes(quantize_codes(w, scale, zero, fmt), scale, zero, fmt)
    assert back.shape == w.shape and float((back - w).norm() / w.norm()) < 0.12


@pytest.mark.parametrize("fmt,act_quant", [(QuantFormat(8, -1, True), False), (QuantFormat(8, -1, True), True),
                                           (QuantFormat(4, 32, True), False), (QuantFormat(4, 64, False), False),
                                           (QuantFormat(2, 64, True, "ternary"), False)])
def test_every_kernel_matches_dequantized_weight(fmt, act_quant):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    layer = QuantLinear(256, 96, True, fmt, act_quant)
    scale, zero = compute_qparams(w, fmt)
    layer.set_codes(quantize_codes(w, scale, zero, fmt), scale, zero, torch.randn(96))
    assert torch.allclose(layer._dense_weight(torch.float32), layer.dequantized_weight(), rtol=0, atol=1e-6)
    assert torch.allclose(layer._dense_weight(torch.bfloat16).float(), layer.dequantized_weight(), rtol=8e-3, atol=1e-6)
    # from here dequantize + GEMM wins (CPU-dependent)
    many = max(packed_kernel_max_rows(fmt.bits, this_cpu()), Q_ROWS_MAX_ROWS, Q_TILES_MAX_ROWS) + 1
    for rows in (1, 3, 40, many):
        x = torch.randn(rows, 256)
        ref = x @ layer.dequantized_weight().t() + layer.bias
        # W8A8 and the few-row native kernel also round the activations (to int8 per token or per 32)
        tolerance = 2e-2 if act_quant or layer.kernel_for(rows, torch.float32) in ("rows_q", "tiles_q") \
            else 1e-5
        assert float((layer(x) - ref).abs().max() / ref.abs().max()) < tolerance, layer.kernel_for(rows)
        # bf16 activations take the few-row kernels, then (many rows) the fast dequantize + bf16 GEMM
        got = layer(x.bfloat16()).float()
        assert float((got - ref).abs().max() / ref.abs().max()) < 3e-2, layer.kernel_for(rows, torch.bfloat16)
    # AVX512-VNNI: the tile kernel; AVX-512 without it, 4-bit: PyTorch's int4pack; else the row kernel
    cpu = this_cpu()
    if q_tiles_fits(cpu):
        few_rows = "tiles_q"
    elif cpu.native and cpu.avx2 and not (fmt.bits == 4 and cpu.avx512):
        few_rows = "rows_q"
    else:
        few_rows = {8: "int8pack", 4: "int4pack"}.get(fmt.bits)
    if fmt.bits in (4, 8) and not act_quant:
        # AMX CPUs: the native 4-bit AMX kernel past the few-row kernel
        assert layer.kernel_for(1) == few_rows
        assert layer.kernel_for(many) == ("amx4" if fmt.bits == 4 and this_cpu().amx else "dense")


@pytest.mark.parametrize("fmt", [QuantFormat(4, 64, False), QuantFormat(4, -1, True)], ids=str)
def test_gptq_output_error_is_lower_than_rtn(fmt):
    """Groups, and per-channel scales over rows longer than GPTQ's 128-column blocks."""
    torch.manual_seed(0)
    k = 256
    x = torch.randn(2048, k) @ (torch.randn(k, k) / k**0.5)  # correlated inputs, as in real layers
    w = torch.randn(64, k) * 0.05
    hessian = 2 * x.t() @ x / x.shape[0]
    scale, zero = compute_qparams(w, fmt)
    rtn = dequantize_codes(quantize_codes(w, scale, zero, fmt), scale, zero, fmt)
    for act_order in (False, True):
        codes, s, z = gptq_quantize_weight(w, hessian, fmt, act_order=act_order)
        gptq = dequantize_codes(codes, s, z, fmt)
        assert (x @ (w - gptq).t()).norm() < 0.8 * (x @ (w - rtn).t()).norm()


@pytest.mark.parametrize("act_order", [False, True])
def test_native_gptq_columns_follow_the_pytorch_steps(monkeypatch, act_order):
    """kernels/gptq_columns.cpp (rows in parallel) against the same column loop in PyTorch ops: the
    same codes but for rare ties at a rounding boundary, the same output error."""
    import miaotui.compress.quantize.gptq as gptq

    if gptq.native_op("gptq_columns") is None:
        pytest.skip("no native kernels here")
    torch.manual_seed(3)
    k = 320  # 2.5 blocks of 128
    x = torch.randn(1024, k) @ (torch.randn(k, k) / k**0.5)
    w = torch.randn(96, k) * 0.05
    hessian = 2 * x.t() @ x / x.shape[0]
    fmt = QuantFormat(4, 64, True)
    native = gptq_quantize_weight(w, hessian, fmt, act_order=act_order)
    monkeypatch.setattr(gptq, "native_op", lambda name: None)
    reference = gptq_quantize_weight(w, hessian, fmt, act_order=act_order)
    assert (native[0] == reference[0]).float().mean() > 0.999
    errors = [float((x @ (w - dequantize_codes(*r, fmt)).t()).norm()) for r in (native, reference)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-3)


def test_frozen_attention_passes_give_the_layer_outputs(tiny_hf_dir, calib_text):
    """layer_by_layer's passes after freeze_attention() run only the MLP half over the stored
    residual stream: the same outputs, and the MLP linears' hooks still see their inputs."""
    from miaotui.compress.calibration import capture_inputs, layer_by_layer

    loaded = load_model(tiny_hf_dir, torch.float32)
    calib = load_calibration(calib_text, loaded.tokenizer, 6, 32)
    for _, layer, forward_all in layer_by_layer(loaded.model, calib, desc="test", batch=4):
        full = forward_all()
        before = capture_inputs(layer, ["mlp.down_proj"], forward_all, stop_early=True)["mlp.down_proj"]
        forward_all.freeze_attention()
        assert torch.equal(forward_all(), full)
        after = capture_inputs(layer, ["mlp.down_proj"], forward_all, stop_early=True)["mlp.down_proj"]
        assert after.count == before.count and torch.equal(after.hessian, before.hessian)
        break


@pytest.mark.parametrize("method,fmt", [("rtn", QuantFormat(8, -1, True)), ("gptq", QuantFormat(4, 32, False)),
                                        ("rtn", QuantFormat(2, 32, True, "binary"))])
def test_quantized_checkpoint_round_trip(tiny_hf_dir, tmp_path, calib_text, method, fmt):
    from miaotui.loaders.miaotui_dir import save_model

    loaded = load_model(tiny_hf_dir, torch.float32)
    calib = load_calibration(calib_text, loaded.tokenizer, 8, 32)
    record = quantize_model(loaded.model, method, fmt, calib)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = loaded.model(ids, torch.arange(5)[None])
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "q", record.to_dict())
    again = load_model(out, torch.float32)
    assert again.format == "miaotui"
    torch.testing.assert_close(again.model(ids, torch.arange(5)[None]), before)
    meta = json.loads((out / "miaotui_model.json").read_text())["compression"]
    assert meta["method"] == method and meta["format"]["bits"] == fmt.bits and len(meta["layers"]) == 8
    if method == "gptq":
        assert len(meta["calibration"]["sha256"]) == 64
    assert again.tokenizer.encode("hello 你好") == loaded.tokenizer.encode("hello 你好")


def test_corrupt_or_mismatched_checkpoint_is_rejected(tiny_hf_dir, tmp_path):
    from miaotui.loaders.miaotui_dir import save_model

    loaded = load_model(tiny_hf_dir, torch.float32)
    record = quantize_model(loaded.model, "rtn", QuantFormat(4, 32, False))
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "q", record.to_dict())
    meta_path = out / "miaotui_model.json"
    meta = json.loads(meta_path.read_text())
    meta["compression"]["format"]["bits"] = 8  # record says 8 bits, tensors hold 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MiaotuiError, match="shape"):
        load_model(out, torch.float32)
    (out / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(MiaotuiError, match="cannot read"):
        load_model(out, torch.float32)


def test_bad_quantization_arguments(tiny_hf_dir, tmp_path, capsys):
    with pytest.raises(MiaotuiError, match="bits"):
        QuantFormat(5, 32, False)
    with pytest.raises(MiaotuiError, match="group size"):
        QuantFormat(4, 48, False)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(MiaotuiError, match="too short"):
        load_calibration(short, load_model(tiny_hf_dir, torch.float32).tokenizer, 128, 512)
    with pytest.raises(MiaotuiError, match="does not exist"):
        load_calibration(tmp_path / "none.txt", load_model(tiny_hf_dir, torch.float32).tokenizer)
    for argv, needle in ((["--method", "rtn", "--bits", "5"], "bits"),
                         (["--method", "gptq", "--calib-file", "/nope.txt"], "'/nope.txt' does not exist"),
                         (["--method", "gptq", "--damp", "0"], "--damp must be > 0"),
                         (["--method", "rtn", "--group-size", "1000"], "group size")):
        code = main(["quantize", "-m", str(tiny_hf_dir), "-o", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_quantize_then_generate(tiny_hf_dir, tmp_path, calib_text, capsys):
    out = tmp_path / "gptq4"
    assert main(["quantize", "-m", str(tiny_hf_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib-file", str(calib_text), "--calib-samples", "4", "--calib-seq-len", "32", "-o", str(out)]) == 0
    assert main(["generate", "-m", str(out), "-p", "Hello", "--max-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["info", "-m", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    dense_bytes = load_model(tiny_hf_dir, torch.float32).model.weight_bytes()
    assert info["format"] == "miaotui" and info["weight_bytes"] < dense_bytes


def test_smoothing_preserves_the_float_function(tiny_llm):
    import copy

    from miaotui.compress.quantize.smoothquant import smooth_layer
    from miaotui.models.plan import layer_plan

    layer = copy.deepcopy(tiny_llm.model.layers[0])
    x = torch.randn(2, 6, tiny_llm.config.hidden_size) * 3
    cos, sin = tiny_llm.model.rotary(torch.arange(6)[None].expand(2, 6), torch.float32)
    before = layer(x, cos, sin, None)
    stats = {n: torch.rand(layer.get_submodule(n).in_features) * 10 for n in
             ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    smooth_layer(layer, layer_plan(tiny_llm.config, 0), stats, alpha=0.5)
    torch.testing.assert_close(layer(x, cos, sin, None), before, rtol=1e-4, atol=1e-4)


def test_smoothquant_w8a8_runs_int_matmul(tiny_hf_dir, calib_text):
    loaded = load_model(tiny_hf_dir, torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    ref = loaded.model(ids, torch.arange(5)[None])
    calib = load_calibration(calib_text, loaded.tokenizer, 8, 32)
    record = quantize_model(loaded.model, "smoothquant", QuantFormat(8, -1, True), calib, alpha=0.5)
    layer = loaded.model.layers[0].self_attn.qkv_proj
    assert record.act_quant and isinstance(layer, QuantLinear) and layer.kernel_for(1) in ("int_mm", "w8a8_float")
    x = torch.randn(20, layer.in_features)
    int_path = layer(x)
    layer.kernel_for = lambda rows, dtype=None: "w8a8_float"
    torch.testing.assert_close(layer(x), int_path, rtol=1e-5, atol=1e-4)  # same arithmetic, other kernel
    del layer.kernel_for
    out = loaded.model(ids, torch.arange(5)[None])
    assert float((out - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(MiaotuiError, match="W8A8"):
        quantize_model(load_model(tiny_hf_dir, torch.float32).model, "smoothquant", QuantFormat(4, 32, True), calib)


def test_smoothquant_gptq_rounds_smoothed_weights_closer_than_rtn(tiny_hf_dir, calib_text):
    """SmoothQuant + GPTQ (llm-compressor's W8A8 recipe): the same smoothing, int8 activations, and
    the int8 weights rounded by GPTQ: the model's outputs on calibration-like text move less."""
    calib = None
    errors = {}
    for method in ("smoothquant", "smoothquant-gptq"):
        loaded = load_model(tiny_hf_dir, torch.float32)
        calib = calib or load_calibration(calib_text, loaded.tokenizer, 8, 32)
        ids = calib.tokens[:2]
        positions = torch.arange(ids.shape[1])[None]
        ref = loaded.model(ids, positions)
        record = quantize_model(loaded.model, method, QuantFormat(8, -1, True), calib, alpha=0.5)
        assert record.act_quant and record.method == method
        assert ("damp" in record.options) == (method == "smoothquant-gptq")
        layer = loaded.model.layers[0].mlp.down_proj
        assert isinstance(layer, QuantLinear) and layer.act_quant
        errors[method] = float((loaded.model(ids, positions) - ref).norm() / ref.norm())
    assert errors["smoothquant-gptq"] < errors["smoothquant"]


def test_smoothquant_alpha_search_picks_the_lowest_w8a8_error():
    from miaotui.compress.quantize.smoothquant import _fake_int8, search_alpha, smoothing_scales

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 40  # outlier channels, as real activations have
    w = torch.randn(48, 64, generator=g)
    a_max = x.abs().amax(0)

    def error(s: torch.Tensor) -> float:
        return float((_fake_int8(x / s, -1) @ _fake_int8(w * s, -1).t() - x @ w.t()).pow(2).mean())
    s, alpha = search_alpha(x, a_max, w)
    assert 0.2 <= alpha <= 0.9
    for fixed in (0.3, 0.5, 0.8):
        assert error(s) <= error(smoothing_scales(a_max, w, fixed)) + 1e-9


def test_awq_search_beats_plain_rounding_with_outlier_channels():
    from miaotui.compress.quantize.awq import search_scales
    from miaotui.layers.quant_formats import fake_quantize

    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    x[:, :4] *= 30  # a few salient input channels, as in real LLM activations
    w = torch.randn(64, 128) * 0.05
    fmt = QuantFormat(4, 64, False)
    s, alpha = search_scales(x, w, fmt)
    plain = (x @ (fake_quantize(w, fmt) - w).t()).norm()
    scaled = (x @ (fake_quantize(w * s, fmt) / s - w).t()).norm()
    assert alpha > 0 and scaled < 0.8 * plain


def test_awq_model_quantization_runs(tiny_hf_dir, calib_text):
    loaded = load_model(tiny_hf_dir, torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    ref = loaded.model(ids, torch.arange(5)[None])
    calib = load_calibration(calib_text, loaded.tokenizer, 8, 32)
    record = quantize_model(loaded.model, "awq", QuantFormat(4, 32, False), calib)
    assert len(record.options["alphas"]) == loaded.config.num_layers
    out = loaded.model(ids, torch.arange(5)[None])
    assert float((out - ref).norm() / ref.norm()) < 0.5


def test_qat_lowers_the_quantized_loss_and_saves_packed(tiny_hf_dir, tmp_path, calib_text):
    from miaotui.compress.quantize.qat import pack_after_qat, train_qat
    from miaotui.eval.perplexity import perplexity
    from miaotui.loaders.miaotui_dir import save_model

    loaded = load_model(tiny_hf_dir, torch.float32)
    ids = torch.tensor(loaded.tokenizer.encode(calib_text.read_text(), add_special_tokens=False))
    train, held_out = ids[:-600], ids[-600:].tolist()
    fmt = QuantFormat(2, 32, True, "ternary")
    before = load_model(tiny_hf_dir, torch.float32)
    quantize_model(before.model, "rtn", fmt)
    ppl_rtn = perplexity(before.model, held_out, ctx=64, progress=False).ppl
    result = train_qat(loaded.model, train, fmt, steps=40, lr=3e-3, batch=4, seq_len=64, progress=False)
    record = pack_after_qat(loaded.model, fmt, result, "0" * 64)
    ppl_qat = perplexity(loaded.model, held_out, ctx=64, progress=False).ppl
    assert result.last_loss < result.first_loss and ppl_qat < ppl_rtn
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "qat", record.to_dict())
    assert load_model(out, torch.float32).format == "miaotui"
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)


def test_dense_path_keeps_its_weight_for_backward():
    """Many rows dequantize per call; with autograd on, the weight must outlive the next layer's call."""
    torch.manual_seed(0)
    fmt = QuantFormat(4, 32, False)
    w = torch.randn(64, 128) * 0.05
    layers = []
    for _ in range(2):
        layer = QuantLinear(128, 64, False, fmt)
        scale, zero = compute_qparams(w if not layers else -w, fmt)
        layer.set_codes(quantize_codes(w if not layers else -w, scale, zero, fmt), scale, zero)
        layers.append(layer)
    x = torch.randn(packed_kernel_max_rows(4, this_cpu()) + 1, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layers[0](x)
    layers[1](x.detach())  # another dense call before the backward pass
    y.float().sum().backward()
    expected = layers[0].dequantized_weight().sum(0).bfloat16().float()
    assert torch.allclose(x.grad[0].float(), expected, rtol=2e-2, atol=2e-2)


def test_inverse_hessian_factor():
    """GPTQ's update coefficients: U upper triangular with U^T U = (H + damp)^-1, the blocked
    triangular inverse included (a width above its block)."""
    from miaotui.compress.calibration import inverse_hessian_cholesky, lower_triangular_inverse

    torch.manual_seed(0)
    k = 300
    x = torch.randn(2 * k, k, dtype=torch.float64)
    h = x.t() @ x
    u = inverse_hessian_cholesky(h, 0.01)
    damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    assert torch.equal(u, u.triu()) and bool((torch.diag(u) > 0).all())
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(damped))
    lower = torch.linalg.cholesky(damped)
    torch.testing.assert_close(lower_triangular_inverse(lower, block=64) @ lower, torch.eye(k, dtype=h.dtype))
