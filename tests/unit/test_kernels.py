"""The native paged-attention kernel against PyTorch's attention over gathered keys."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from miaotui.kernels import native_op


@pytest.fixture(scope="module")
def op():
    kernel = native_op("paged_attention")
    if kernel is None:
        assert shutil.which("c++") is None, "a C++ compiler is here, but the kernel did not build"
        pytest.skip("no C++ compiler: the PyTorch path serves")
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 4])
def test_paged_attention_matches_sdpa_over_gathered_keys(op, dtype, n):
    torch.manual_seed(0)
    rows, heads, kv_heads, hd, slots, t = 5, 6, 2, 32, 300, 40
    k_pool = torch.randn(slots, kv_heads, hd).to(dtype)
    v_pool = torch.randn(slots, kv_heads, hd).to(dtype)
    gather = torch.stack([torch.randperm(slots)[:t] for _ in range(rows)])
    starts = torch.randint(0, t - n + 1, (rows,))  # tokens already cached before this step's n
    lengths = starts[:, None] + torch.arange(n)[None, :] + 1  # query i sees its prefix [G, n]
    q = torch.randn(rows, n, heads, hd)
    got = op(q, k_pool, v_pool, gather, lengths, hd ** -0.5)
    keys = k_pool[gather].float().transpose(1, 2)  # [G, KV, T, hd]
    values = v_pool[gather].float().transpose(1, 2)
    mask = torch.arange(t)[None, None, :] < lengths[:, :, None]  # [G, n, T]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         enable_gqa=True).transpose(1, 2)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_each_query_is_independent_of_its_batch(op):
    """A row's output is the same bits alone or among others (batching never changes greedy picks)."""
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(200, 2, 16), torch.randn(200, 2, 16)
    gather = torch.randint(0, 200, (3, 50))
    lengths = torch.tensor([[50], [20], [7]])
    q = torch.randn(3, 1, 4, 16)
    together = op(q, k_pool, v_pool, gather, lengths, 0.25)
    alone = op(q[1:2].contiguous(), k_pool, v_pool, gather[1:2].contiguous(), lengths[1:2].contiguous(), 0.25)
    assert torch.equal(together[1:2], alone)


def test_bad_shapes_are_clear_errors(op):
    q = torch.randn(1, 1, 4, 16)
    pool = torch.randn(10, 2, 16)
    with pytest.raises(RuntimeError, match="lengths beyond gather"):
        op(q, pool, pool, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[5]]), 0.25)


def test_native_rope_gives_the_bits_of_apply_rope(op):
    from miaotui.layers.rope import RotaryEmbedding, apply_rope

    torch.manual_seed(2)
    tokens, heads, hd = 37, 12, 64
    qkv = (torch.randn(tokens, heads + 3, hd) * 3).bfloat16()  # rotate the first 12 heads, leave 3
    cos, sin = RotaryEmbedding(hd, 10000.0, None)(torch.arange(tokens)[None], torch.bfloat16)  # [1, 1, T, hd]
    ref = apply_rope(qkv[:, :heads].transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    got = qkv.clone()
    native_op("rope_bf16_")(got[:, :heads], cos[0, 0].contiguous(), sin[0, 0].contiguous())
    assert torch.equal(got[:, :heads], ref) and torch.equal(got[:, heads:], qkv[:, heads:])


def test_native_rms_norm_matches_the_pytorch_path(op):
    from miaotui.layers.norm import RMSNorm

    torch.manual_seed(3)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    norm = norm.bfloat16().requires_grad_(False)
    x = (torch.randn(2, 7, 96) * 4).bfloat16()
    with torch.inference_mode():
        got = norm(x)  # native under inference
    ref = F.rms_norm(x.float(), (96,), None, 1e-5).bfloat16() * norm.weight  # what layers/norm.py computes in grad mode
    assert torch.equal(norm(x), ref)  # grad mode: the PyTorch path
    assert float((got.float() - ref.float()).abs().max() / ref.float().abs().max()) < 1e-2
    assert (got == ref).float().mean() > 0.98  # the sum of squares is the only other order


def _has_amx() -> bool:
    op = native_op("has_amx")
    return op is not None and bool(op())


def _bf16_dot() -> bool:
    from miaotui.runtime import cpu_flags

    return "avx512_bf16" in cpu_flags()


@pytest.mark.skipif(not _bf16_dot(), reason="the bf16 attention path needs AVX512-BF16")
@pytest.mark.parametrize("block_aligned", [True, False])
def test_bf16_paged_attention_matches_sdpa_and_is_batch_independent(op, block_aligned):
    """bf16 queries and pool (the bf16 model's decode): keys read in place, on AMX 16 pool slots at
    a time when they are one block's consecutive slots, else key by key; same result either way."""
    torch.manual_seed(4)
    rows, n, heads, kv_heads, hd, slots, t = 4, 2, 9, 3, 64, 512, 70
    k_pool = torch.randn(slots, kv_heads, hd).bfloat16()
    v_pool = torch.randn(slots, kv_heads, hd).bfloat16()
    if block_aligned:  # the engine's layout: blocks of 16 consecutive slots, in any order
        blocks = torch.stack([torch.randperm(slots // 16)[: (t + 15) // 16] for _ in range(rows)])
        gather = (blocks[:, :, None] * 16 + torch.arange(16)).view(rows, -1)[:, :t].contiguous()
    else:
        gather = torch.stack([torch.randperm(slots)[:t] for _ in range(rows)])
    lengths = torch.tensor([[t - 1, t], [40, 41], [16, 17], [3, 4]])
    q = torch.randn(rows, n, heads, hd).bfloat16()
    got = op(q, k_pool, v_pool, gather, lengths, hd ** -0.5)
    assert got.dtype == torch.bfloat16
    keys = k_pool[gather].float().transpose(1, 2)
    values = v_pool[gather].float().transpose(1, 2)
    mask = torch.arange(t)[None, None, :] < lengths[:, :, None]
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=1e-2)  # bf16 output rounding
    alone = op(q[2:3].contiguous(), k_pool, v_pool, gather[2:3].contiguous(), lengths[2:3].contiguous(), hd ** -0.5)
    assert torch.equal(alone, got[2:3])


def test_dequantize_8bit_gives_the_layer_weight():
    """The 8-bit prefill path rebuilds the weight in one native pass: w = code * scale + offset per
    group (576 = 4 x 128 + 64: the last group is shorter), float32 then one rounding."""
    from miaotui.layers.quant_formats import QuantFormat, compute_qparams, quantize_codes
    from miaotui.layers.quantized_linear import QuantLinear

    op = native_op("dequantize_8bit")
    if op is None:
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    for fmt in (QuantFormat(8, 128, False), QuantFormat(8, 32, True), QuantFormat(8, -1, True)):
        w = torch.randn(96, 576)
        layer = QuantLinear(576, 96, False, fmt)
        scale, zero = compute_qparams(w, fmt)
        layer.set_codes(quantize_codes(w, scale, zero, fmt), scale, zero)
        exact = layer.dequantized_weight(torch.float32)
        with torch.no_grad():
            got32 = layer._dense_weight(torch.float32).clone()
            got16 = layer._dense_weight(torch.bfloat16).clone()
        torch.testing.assert_close(got32, exact, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got16, exact.bfloat16(), rtol=2 ** -7, atol=1e-6)  # within one bf16 step
    with pytest.raises(RuntimeError, match="scale, offset"):
        op(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3), torch.zeros(4, 3), 32, torch.empty(4, 64))


@pytest.mark.skipif(not _has_amx(), reason="the AMX bf16 kernel needs AMX-BF16")
def test_amx_bf16_linear_on_tiles_matches_the_plain_matmul():
    """linear_bf16_amx multiplies a weight in bf16_tiles_layout in place: float32 sums over K as a
    plain bf16 GEMM, one rounding; a row's bits do not depend on the rows beside it."""
    from miaotui.layers.linear import bf16_tiles_layout

    torch.manual_seed(0)
    w, x = torch.randn(200, 576, dtype=torch.bfloat16), torch.randn(70, 576, dtype=torch.bfloat16)  # 13 tiles
    tiles = bf16_tiles_layout(w)
    got = native_op("linear_bf16_amx")(x, tiles, 200)
    exact = (x.double() @ w.double().t()).bfloat16()
    assert got.shape == (70, 200)
    assert float((got.float() - exact.float()).abs().max() / exact.float().abs().max()) < 8e-3
    for rows in (1, 9, 16, 17):
        assert torch.equal(native_op("linear_bf16_amx")(x[:rows].contiguous(), tiles, 200), got[:rows])
    with pytest.raises(RuntimeError, match="tiles: contiguous bf16"):
        native_op("linear_bf16_amx")(x, tiles, 300)


@pytest.mark.skipif(not _has_amx(), reason="the AMX 4-bit kernel needs AMX-BF16")
def test_amx_int4_linear_matches_dequantize_then_matmul():
    """int4_amx_linear multiplies by the dequantized weight (the bits of dequantize_4bit), summing
    in float32; a row's result does not depend on how many rows share the call."""
    from miaotui.layers.quantized_linear import amx_int4_layout

    torch.manual_seed(5)
    n, k, groups = 96, 192, 6  # 6 column blocks: one full panel of 4 and a narrower one
    nibbles = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, offset = torch.rand(n, groups) * 0.05, torch.randn(n, groups) * 0.1
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    weight = torch.empty(n, k, dtype=torch.bfloat16)
    native_op("dequantize_4bit")(packed, scale, offset, weight)
    wq, meta = amx_int4_layout(nibbles, scale, offset)
    x = torch.randn(37, k).bfloat16()
    got = native_op("int4_amx_linear")(x, wq, meta)
    ref = x.float() @ weight.float().t()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=1e-2)
    for rows in (1, 5, 16, 17):
        assert torch.equal(native_op("int4_amx_linear")(x[:rows].contiguous(), wq, meta), got[:rows])
    with pytest.raises(RuntimeError, match="columns"):
        native_op("int4_amx_linear")(x[:, :160].contiguous(), wq, meta)


@pytest.mark.skipif(not _bf16_dot(), reason="the fused bf16 decode attention needs AVX512-BF16")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_decode_attention_gives_the_bits_of_the_unfused_path(n, kv_cache_dtype):
    """paged_attention_qkv (rope + pool writes + attention in one op) against the layer's unfused
    native path: the same output bits and the same pool contents (a quantized cache's codes and
    scales written by the native op and by paged_cache.quantize_rows alike)."""
    from miaotui.engine.paged_cache import AttentionGroup, PagedKVCache
    from miaotui.layers.attention import Attention
    from miaotui.layers.rope import RotaryEmbedding
    from miaotui.models.config import ModelConfig

    torch.manual_seed(6)
    config = ModelConfig("llama", 100, 576, 1536, 1, 9, 3, 64)
    attn = Attention(config)
    for p in attn.parameters():
        p.data = torch.randn_like(p) * 0.05
    attn = attn.bfloat16()
    block, rows = 16, 3
    starts = [37, 16, 5]  # tokens each row has cached; its n new tokens follow
    caches = [PagedKVCache(config, 20, block, torch.bfloat16, torch.device("cpu"), kv_cache_dtype) for _ in range(2)]
    pools = [(c.keys[0], c.values[0], c.key_scales[0], c.value_scales[0]) for c in caches]
    for first, other in zip(pools[0], pools[1], strict=True):  # the same cached tokens in both
        if first is not None:
            raw = first.view(torch.uint8) if first.element_size() == 1 else first
            if first.dtype == torch.int8:
                raw.copy_(torch.randint(-127, 128, raw.shape, dtype=torch.int8).view(torch.uint8))
            elif first.dtype == torch.float8_e4m3fn:
                raw.copy_(torch.randn(raw.shape).mul(40).to(torch.float8_e4m3fn).view(torch.uint8))
            else:
                raw.copy_(torch.rand(raw.shape).mul(0.05) if first.dtype == torch.float16 else torch.randn(raw.shape))
            other.copy_(first)
    tables = [[3, 7, 1, 9], [2, 5, 11, 12], [4, 0, 6, 8]]
    slot = [lambda p, t=t: t[p // block] * block + p % block for t in tables]
    t_max = max(starts) + n
    gather = torch.tensor([[slot[r](p) if p < starts[r] + n else 0 for p in range(t_max)] for r in range(rows)])
    lengths = torch.tensor([[starts[r] + i + 1 for i in range(n)] for r in range(rows)])
    mask = torch.arange(t_max)[None, None, None, :] < lengths[:, None, :, None]
    group = AttentionGroup(torch.arange(rows * n).view(rows, n), gather, mask, lengths)
    slots = torch.tensor([slot[r](starts[r] + i) for r in range(rows) for i in range(n)])
    positions = torch.tensor([[starts[r] + i for r in range(rows) for i in range(n)]])
    cos, sin = RotaryEmbedding(64, 10000.0, None)(positions, torch.bfloat16)
    x = torch.randn(1, rows * n, 576).bfloat16()
    outs = []
    for fused, cache in zip((True, False), caches, strict=True):
        if not fused:
            cache.fused = None
        view = cache.step_views(slots, [group])[0]
        with torch.inference_mode():
            outs.append(attn(x, cos, sin, view))
    assert caches[0].fused is not None
    assert torch.equal(outs[0], outs[1])
    for first, other in zip(pools[0], pools[1], strict=True):
        assert first is None or torch.equal(first.view(torch.uint8) if first.element_size() == 1 else first,
                                            other.view(torch.uint8) if other.element_size() == 1 else other)
    if kv_cache_dtype != "auto":  # the new tokens' slots were written
        assert caches[0].key_scales[0].view(-1, 3)[slots].gt(0).all()


@pytest.mark.parametrize("code", ["int8", "fp8"])
def test_kv_codes_round_trip_within_half_a_step(code):
    """int8: |x - code * scale| <= scale / 2 with scale = absmax / 127; fp8 e4m3: within 2^-4
    relative (3 mantissa bits) above its subnormals; an all-zero head gives zero codes."""
    from miaotui.engine.paged_cache import _CODES, dequantize_rows, quantize_rows

    torch.manual_seed(11)
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    x[7, 1] = 0
    codes, scales = quantize_rows(x, _CODES[code])
    assert codes.dtype == _CODES[code] and scales.dtype == torch.float16 and scales.shape == (50, 3)
    back = dequantize_rows(codes, scales, torch.float32)
    assert torch.equal(back[7, 1], torch.zeros(64))
    step = scales.float()[..., None]
    if code == "int8":
        assert (back - x).abs().le(step / 2 * 1.002).all()
        assert codes.abs().max() == 127
    else:
        normal = x.abs() >= step * 2 ** -6
        assert ((back - x).abs() <= x.abs() * 2 ** -4 + 1e-12)[normal].all()


@pytest.mark.parametrize("code", ["int8", "fp8"])
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_reads_quantized_pools_in_place(op, code, query_dtype):
    """Codes + float16 scales per (slot, kv head): the kernel's result equals attention over the
    dequantized keys and values (float32 queries: any CPU; bf16: the AVX-512 code path)."""
    from miaotui.engine.paged_cache import _CODES, dequantize_rows, quantize_rows

    if query_dtype == torch.bfloat16 and not _bf16_dot():
        pytest.skip("bf16 queries over codes need AVX-512")
    torch.manual_seed(12)
    rows, n, heads, kv_heads, hd, slots, t = 4, 2, 9, 3, 64, 400, 90
    (k_codes, k_scales), (v_codes, v_scales) = (quantize_rows(torch.randn(slots, kv_heads, hd) * 2, _CODES[code])
                                                for _ in range(2))
    gather = torch.stack([torch.randperm(slots)[:t] for _ in range(rows)])
    lengths = torch.tensor([[t - 1, t], [40, 41], [16, 17], [1, 2]])
    q = torch.randn(rows, n, heads, hd).to(query_dtype)
    got = op(q, k_codes, v_codes, gather, lengths, hd ** -0.5, k_scales, v_scales)
    assert got.dtype == query_dtype
    keys = dequantize_rows(k_codes, k_scales, torch.float32)[gather].transpose(1, 2)  # [G, KV, T, hd]
    values = dequantize_rows(v_codes, v_scales, torch.float32)[gather].transpose(1, 2)
    mask = torch.arange(t)[None, None, :] < lengths[:, :, None]
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         enable_gqa=True).transpose(1, 2)
    tolerance = 1e-5 if query_dtype == torch.float32 else 1e-2  # bf16 output rounding
    torch.testing.assert_close(got.float(), ref, atol=tolerance, rtol=tolerance)
    alone = op(q[2:3].contiguous(), k_codes, v_codes, gather[2:3].contiguous(), lengths[2:3].contiguous(),
               hd ** -0.5, k_scales, v_scales)
    assert torch.equal(alone, got[2:3])
    with pytest.raises(RuntimeError, match="needs its scales"):
        op(q, k_codes, v_codes, gather, lengths, hd ** -0.5)


def test_native_silu_mul_matches_the_pytorch_path(op):
    torch.manual_seed(7)
    x = (torch.randn(37, 2 * 300) * 4).bfloat16()
    got = native_op("silu_mul_bf16")(x)
    gate, up = x.split(300, dim=-1)
    ref = F.silu(gate) * up  # layers' bf16 path: two roundings
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert (got == ref).float().mean() > 0.99  # exp's last float32 bit may differ (one bf16 step)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
