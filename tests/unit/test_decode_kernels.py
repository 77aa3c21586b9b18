"""The few-row matmul kernels (kernels/decode_matmul.cpp) and which kernel runs for which call.

The choice is pinned for each CPU kind we run on (simulated caps), so a format that would decode
through dequantize-per-token (int8 g128 once ran so at 2.3 tok/s) fails a test, not a benchmark."""

import shutil

import pytest
import torch

from miaotui.kernels import native_op
from miaotui.layers.kernel_choice import (
    AMX_BF16_MAX_ROWS,
    BF16_TILES_MAX_ROWS,
    Q_ROWS_MAX_ROWS,
    Q_TILES_MAX_ROWS,
    CpuCaps,
    bf16_kernel,
    q_tiles_fits,
    quant_kernel,
    this_cpu,
)
from miaotui.layers.quant_formats import QuantFormat, compute_qparams, quantize_codes
from miaotui.layers.quantized_linear import QuantLinear

ZEN3 = CpuCaps.from_flags({"avx2"}, native=True)
ZEN5 = CpuCaps.from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, native=True)
XEON_AMX = CpuCaps.from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}, native=True)
NO_COMPILER = CpuCaps.from_flags({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, native=False)
BF16 = torch.bfloat16
# What `miaotui quantize` and the demo write, and the GGUF-like classes (K = 576: SmolLM2's width)
FORMATS = [QuantFormat(8, -1, True), QuantFormat(8, 128, False), QuantFormat(8, 32, True), QuantFormat(4, 32, True),
           QuantFormat(4, 32, False), QuantFormat(4, 128, False), QuantFormat(3, 64, False)]


@pytest.mark.parametrize("caps", [ZEN3, ZEN5, XEON_AMX], ids=["zen3", "zen5", "xeon-amx"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_every_written_format_decodes_in_its_own_bits(caps, fmt):
    for rows in (1, 4, Q_ROWS_MAX_ROWS, Q_TILES_MAX_ROWS):
        for dtype in (BF16, torch.float32):
            got = quant_kernel(fmt, 576, 1536, rows, dtype, caps)
            if caps.int8_dot:  # AVX512-VNNI: 16-row tiles, one dot product per 64 bytes, up to 40 rows
                assert got == "tiles_q"
            elif rows <= Q_ROWS_MAX_ROWS:  # AVX2: row by row
                assert got == "rows_q"
    many = quant_kernel(fmt, 576, 1536, 512, BF16, caps)
    assert many == ("amx4" if caps.amx and fmt.storage_bits == 4 else "dense")  # prefill: compute-bound GEMMs


AVX512_NO_VNNI = CpuCaps.from_flags({"avx2", "avx512f"}, native=True)


def test_avx512_without_vnni_takes_pytorch_int4pack_for_4_bit():
    # 4-bit with bf16 activations: int4pack streams faster there than the AVX2 row kernel (decode_kernels.md)
    assert quant_kernel(QuantFormat(4, 32, True), 576, 1536, 1, BF16, AVX512_NO_VNNI) == "int4pack"
    assert quant_kernel(QuantFormat(4, 32, True), 576, 1536, 1, torch.float32, AVX512_NO_VNNI) == "rows_q"
    assert quant_kernel(QuantFormat(8, 128, False), 576, 1536, 1, BF16, AVX512_NO_VNNI) == "rows_q"


def test_choice_without_the_native_kernels_and_off_the_cpu():
    assert quant_kernel(QuantFormat(4, 32, True), 576, 1536, 1, BF16, NO_COMPILER) == "int4pack"
    assert quant_kernel(QuantFormat(8, -1, True), 576, 1536, 1, BF16, NO_COMPILER) == "int8pack"
    assert quant_kernel(QuantFormat(8, -1, True), 576, 1536, 1, BF16, ZEN5, on_cpu=False) == "int8pack"
    assert quant_kernel(QuantFormat(8, -1, True), 576, 1536, 1, BF16, ZEN5, act_quant=True) == "int_mm"
    assert quant_kernel(QuantFormat(8, -1, True), 576, 1536, 1, BF16, ZEN3, act_quant=True) == "w8a8_float"
    assert quant_kernel(QuantFormat(4, 32, True), 576, 1536, 1, torch.float16, ZEN5) == "int4pack"
    assert quant_kernel(QuantFormat(2, 64, True, "ternary"), 576, 1536, 1, BF16, ZEN5) == "dense"
    assert quant_kernel(QuantFormat(4, 32, True), 560, 1536, 1, BF16, ZEN5) == "dense"  # K not in 32-blocks
    assert quant_kernel(QuantFormat(8, 128, False), 576, 1536, 1, torch.float16, ZEN5) == "dense"


def test_bf16_weights_take_the_tile_kernels_on_avx512_bf16():
    for rows in (1, 4, BF16_TILES_MAX_ROWS):  # decode-sized: the weight streams once, in tiles
        assert bf16_kernel(rows, 576, BF16, BF16, ZEN5) == bf16_kernel(rows, 576, BF16, BF16, XEON_AMX) == "tiles_bf16"
    for rows in (BF16_TILES_MAX_ROWS + 1, 16, AMX_BF16_MAX_ROWS):  # AMX multiplies the same tiles; elsewhere PyTorch
        assert bf16_kernel(rows, 576, BF16, BF16, XEON_AMX) == "amx_bf16"
        assert bf16_kernel(rows, 576, BF16, BF16, ZEN5) is None
    assert bf16_kernel(AMX_BF16_MAX_ROWS + 1, 576, BF16, BF16, XEON_AMX) is None  # prefill: PyTorch's GEMM
    assert bf16_kernel(1, 576, BF16, BF16, ZEN3) is None and bf16_kernel(1, 576, BF16, BF16, NO_COMPILER) is None
    assert bf16_kernel(1, 576, torch.float32, BF16, ZEN5) is None
    assert bf16_kernel(1, 576, BF16, torch.float32, ZEN5) is None
    assert bf16_kernel(1, 560, BF16, BF16, ZEN5) is None  # K not in 32-blocks
    assert bf16_kernel(1, 576, BF16, BF16, ZEN5, on_cpu=False) is None


@pytest.fixture(scope="module")
def caps():
    if native_op("linear_q_rows") is None:
        assert shutil.which("c++") is None, "a C++ compiler is here, but the kernels did not build"
        pytest.skip("no C++ compiler: the PyTorch kernels serve")
    if not this_cpu().avx2:
        pytest.skip("the few-row kernels need AVX2")
    return this_cpu()


def _layer(fmt: QuantFormat, k: int = 576, n: int = 200, bias: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    layer = QuantLinear(k, n, bias, fmt)
    scale, zero = compute_qparams(w, fmt)
    layer.set_codes(quantize_codes(w, scale, zero, fmt), scale, zero, torch.randn(n) if bias else None)
    return layer


def _int8_blocks(x: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """x [M, K] rounded as the kernel rounds it: int8 per 32-wide block, scale amax / 127; for 8-bit
    weights (residual) plus the block's rounding error in int8 steps of scale / 128."""
    blocks = x.float().view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    scaled = blocks / torch.where(d > 0, d, 1)
    codes = torch.round(scaled)
    if residual:
        codes = codes + torch.round((scaled - codes) * 128) / 128
    return (codes * d).view_as(x)


def _stored_half(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """t as the tiles hold it: float16 of t * 2^exponent, scaled back."""
    return torch.ldexp(torch.ldexp(t, torch.tensor(float(exponent))).half().float(), torch.tensor(float(-exponent)))


def _kernel_weight(layer: QuantLinear, fmt: QuantFormat) -> torch.Tensor:
    """[N, K] float64: the weight the layer's few-row kernel multiplies by (tiles: float16 scales)."""
    if layer._q_tiles is None:
        return layer.dequantized_weight().double()
    scale = layer.scale.float()
    offset = -(layer.zero.float() - fmt.qmin) * scale
    scale_h = _stored_half(scale, layer._q_tiles.exponent)
    offset_h = -(layer.zero.float() - fmt.qmin) * scale_h if fmt.symmetric else \
        _stored_half(offset, layer._q_tiles.exponent)
    group = torch.arange(layer.in_features) // fmt.group_width(layer.in_features)  # the last group may be short
    u = (layer.codes() - fmt.qmin).double()
    return u * scale_h.double()[:, group] + offset_h.double()[:, group]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_q_rows_is_exact_over_int8_activations(caps, fmt, dtype):
    layer = _layer(fmt)
    x = torch.randn(5, 576).to(dtype)
    assert layer.kernel_for(5, dtype) == ("tiles_q" if q_tiles_fits(caps) else "rows_q")
    got = layer(x).double()
    weight = _kernel_weight(layer, fmt)
    # 8-bit weights and float32 activations: int8 activations plus their residual (the float path's precision)
    fine = fmt.storage_bits == 8 or dtype == torch.float32
    exact = _int8_blocks(x, residual=fine).double() @ weight.t() + layer.bias.double()
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the output
    assert float((got - exact).abs().max() / exact.abs().max()) < tolerance
    unrounded = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
    error = float((got - unrounded).abs().max() / unrounded.abs().max())
    # with the residual only the tiles' float16 scales (11 bits) and the output's rounding are left
    assert error < (1e-3 if fine and dtype == torch.float32 else 8e-3 if fine else 2e-2)


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, True), QuantFormat(8, 128, False)], ids=str)
def test_a_row_gets_the_same_bits_alone_or_among_others(caps, fmt):
    layer = _layer(fmt, n=203)  # not a multiple of the 4-row tile
    x = torch.randn(Q_ROWS_MAX_ROWS, 576, dtype=BF16)
    together = layer(x)
    for i in (0, 7, Q_ROWS_MAX_ROWS - 1):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_row_and_tile_kernels_agree(caps, fmt):
    # both native kernels on this CPU (the AVX2 row kernel is what Zen 3 runs): same int8 block sums
    if not q_tiles_fits(caps):
        pytest.skip("linear_q_tiles needs AVX512-VNNI")
    layer = _layer(fmt, n=203)
    x = torch.randn(6, 576)
    tiles = layer._q_tiles
    # the tiles keep scales (and offsets) in float16 times 2^exponent; symmetric formats keep no offsets
    assert tiles.meta.dtype == torch.float16 and tiles.meta.shape[2] == (1 if fmt.symmetric else 2)
    assert (tiles.zero_code == -fmt.qmin) if fmt.symmetric else tiles.zero_code == -1

    scale = _stored_half(layer.scale.float(), tiles.exponent)
    offset = -(layer.zero.float() - fmt.qmin) * scale if fmt.symmetric else \
        _stored_half(-(layer.zero.float() - fmt.qmin) * layer.scale.float(), tiles.exponent)
    rows = native_op("linear_q_rows")(x, layer.packed, scale, offset, fmt.storage_bits,
                                      fmt.group_width(576), layer.bias)
    assert layer.kernel_for(6, torch.float32) == "tiles_q"
    assert float((layer(x) - rows).abs().max() / rows.abs().max()) < 1e-5
    exact = native_op("linear_q_rows")(x, layer.packed, layer.scale.float(), -(layer.zero.float() - fmt.qmin)
                                       * layer.scale.float(), fmt.storage_bits, fmt.group_width(576), layer.bias)
    assert float((layer(x) - exact).abs().max() / exact.abs().max()) < 1e-3  # float16's 11 bits


def test_bad_q_rows_inputs_are_clear_errors(caps):
    op = native_op("linear_q_rows")
    codes, scale = torch.zeros(8, 288, dtype=torch.uint8), torch.ones(8, 18)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        op(torch.zeros(1, 576), codes, scale, scale, 4, 20, None)
    with pytest.raises(RuntimeError, match="codes"):
        op(torch.zeros(1, 576), codes[:, :100].contiguous(), scale, scale, 4, 32, None)


def test_bad_q_tiles_inputs_are_clear_errors(caps):
    if not q_tiles_fits(caps):
        pytest.skip("linear_q_tiles needs AVX512-VNNI")
    op = native_op("linear_q_tiles")
    tiles, meta = torch.zeros(1, 18, 4, 64, dtype=torch.uint8), torch.zeros(1, 18, 2, 16, dtype=torch.float16)
    assert op(torch.zeros(1, 576), tiles, meta, 16, 4, 32, -1, 0, None).shape == (1, 16)
    with pytest.raises(RuntimeError, match="tiles"):
        op(torch.zeros(1, 576), tiles, meta, 17, 4, 32, -1, 0, None)  # 17 rows need two tiles
    with pytest.raises(RuntimeError, match="meta"):
        op(torch.zeros(1, 576), tiles, meta, 16, 4, 64, -1, 0, None)  # 9 groups of 64, meta has 18
    with pytest.raises(RuntimeError, match="meta"):
        op(torch.zeros(1, 576), tiles, meta, 16, 4, 32, 8, 0, None)  # a zero code: scales only
    with pytest.raises(RuntimeError, match="meta"):
        op(torch.zeros(1, 576), tiles, meta.float(), 16, 4, 32, -1, 0, None)
    with pytest.raises(RuntimeError, match="zero code"):
        op(torch.zeros(1, 576), tiles, meta[:, :, :1].contiguous(), 16, 4, 32, 16, 0, None)
    with pytest.raises(RuntimeError, match="bf16 or float32"):
        op(torch.zeros(1, 576, dtype=torch.float16), tiles, meta, 16, 4, 32, -1, 0, None)


@pytest.fixture(scope="module")
def bf16_tiles_op():
    if not (this_cpu().native and this_cpu().avx512_bf16):
        pytest.skip("linear_bf16_tiles needs AVX512-BF16")
    return native_op("linear_bf16_tiles")


def test_bf16_tiles_match_float_sums_and_are_batch_invariant(bf16_tiles_op):
    from miaotui.layers.linear import bf16_tiles_layout

    torch.manual_seed(0)
    w, x, b = torch.randn(203, 576, dtype=BF16), torch.randn(BF16_TILES_MAX_ROWS, 576, dtype=BF16), torch.randn(203)
    tiles = bf16_tiles_layout(w)  # 203 rows: the last tile is padded
    assert tiles.shape == (13, 18, 16, 32)
    got = bf16_tiles_op(x, tiles, 203, b)
    exact = (x.double() @ w.double().t() + b.double()).bfloat16()
    assert float((got.float() - exact.float()).abs().max() / exact.float().abs().max()) < 8e-3
    for i in (0, 5, BF16_TILES_MAX_ROWS - 1):
        assert torch.equal(bf16_tiles_op(x[i:i + 1].contiguous(), tiles, 203, b), got[i:i + 1])
    with pytest.raises(RuntimeError, match="tiles: contiguous bf16"):
        bf16_tiles_op(x, tiles, 300, b)
    with pytest.raises(RuntimeError, match="K % 32"):
        bf16_tiles_op(x[:, :100].contiguous(), tiles, 203, b)


def test_8_bit_groups_of_16_take_the_tile_kernel(caps):
    """GGUF's Q6_K (8-bit slots, groups of 16): linear_q_tiles on VNNI CPUs, dense elsewhere; exact
    over int8 activations and their residual, as the other 8-bit formats."""
    fmt = QuantFormat(8, 16, True)
    assert quant_kernel(fmt, 576, 1536, 1, BF16, ZEN5) == quant_kernel(fmt, 576, 1536, 40, BF16, XEON_AMX) == "tiles_q"
    assert quant_kernel(fmt, 576, 1536, 1, BF16, ZEN3) == "dense"  # (the row kernel takes groups of whole blocks)
    if not q_tiles_fits(caps):
        pytest.skip("linear_q_tiles needs AVX512-VNNI")
    layer = _layer(fmt, n=203)
    x = torch.randn(5, 576)
    exact = _int8_blocks(x, residual=True).double() @ _kernel_weight(layer, fmt).t() + layer.bias.double()
    assert float((layer(x).double() - exact).abs().max() / exact.abs().max()) < 1e-5
    t = layer._q_tiles  # the tiles dequantized (a prefill's weight) are the kernel's weight
    out = torch.empty(203, 576)
    native_op("dequantize_q_tiles")(t.tiles, t.meta, 203, 8, 16, t.zero_code, t.exponent, out)
    torch.testing.assert_close(out.double(), _kernel_weight(layer, fmt), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", FORMATS[:6], ids=str)
def test_tiles_dequantize_and_gather_rows_as_the_kernel_multiplies(caps, fmt):
    if not q_tiles_fits(caps):
        pytest.skip("the tiles exist on AVX512-VNNI CPUs")
    layer = _layer(fmt, n=203)
    t, weight = layer._q_tiles, _kernel_weight(layer, fmt)
    for dtype in (torch.float32, BF16):
        out = torch.empty(203, 576, dtype=dtype)
        native_op("dequantize_q_tiles")(t.tiles, t.meta, 203, fmt.storage_bits, fmt.group_width(576), t.zero_code,
                                        t.exponent, out)
        tolerance = 1e-6 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(out.double(), weight, rtol=tolerance, atol=tolerance * float(weight.abs().max()))
    ids = torch.tensor([0, 15, 16, 202, 7])
    rows = native_op("embedding_q_tiles")(t.tiles, t.meta, ids, fmt.storage_bits, fmt.group_width(576), t.zero_code,
                                          t.exponent, torch.float32)
    torch.testing.assert_close(rows.double(), weight[ids], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="out of range"):
        native_op("embedding_q_tiles")(t.tiles, t.meta, torch.tensor([208]), fmt.storage_bits, fmt.group_width(576),
                                       t.zero_code, t.exponent, torch.float32)
