"""Kernel choice of dense linears: the float16 decode copy serves few-row calls, float32 the rest."""

import pytest
import torch

from miaotui.layers.kernel_choice import KernelLog, bf16_kernel, bf16_tiles_fits, this_cpu
from miaotui.layers.linear import NARROW_MATMUL_MAX_ROWS, Linear


def _layer() -> Linear:
    torch.manual_seed(0)
    layer = Linear(64, 32, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64) * 0.1)
        layer.bias.copy_(torch.randn(32))
    return layer


def test_few_rows_use_the_narrow_copy_and_stay_close():
    layer = _layer()
    x = torch.randn(1, 64)
    exact = layer(x)
    layer.add_narrow_weight(torch.float16)
    approx = layer(x)
    assert approx.dtype == torch.float32
    assert not torch.equal(approx, exact)  # it really ran in float16
    torch.testing.assert_close(approx, exact, rtol=2e-3, atol=2e-3)


def test_many_rows_use_the_full_precision_weight():
    layer = _layer()
    x = torch.randn(NARROW_MATMUL_MAX_ROWS + 1, 64)
    exact = layer(x)
    layer.add_narrow_weight(torch.float16)
    assert torch.equal(layer(x), exact)


def test_overflowing_activations_fall_back_to_float32():
    layer = _layer()
    x = torch.full((1, 64), 1e5)
    exact = layer(x)
    layer.add_narrow_weight(torch.float16)
    assert torch.isfinite(layer(x)).all() and torch.equal(layer(x), exact)


def test_decode_copy_is_counted_in_weight_bytes(tiny_hf_dir):
    from miaotui.loaders.load import load_model

    plain = load_model(tiny_hf_dir, torch.float32)
    with_copy = load_model(tiny_hf_dir, torch.float32, decode_weight_dtype=torch.float16)
    assert with_copy.model.weight_bytes() > plain.model.weight_bytes()


def test_int8_head_copy_keeps_the_best_logits_exact(tiny_hf_dir):
    """The int8 head copy serves few-row calls; its best candidates are recomputed from the real
    head, so greedy picks and the top logits equal the bf16 model's own."""
    from miaotui.loaders.load import load_model
    from miaotui.models.transformer import INT8_HEAD_MAX_ROWS

    plain = load_model(tiny_hf_dir, torch.bfloat16).model
    with_copy = load_model(tiny_hf_dir, torch.bfloat16, decode_weight_dtype=torch.int8).model
    assert with_copy.head_int8 is not None or with_copy.head_q is not None
    assert with_copy.weight_bytes() > plain.weight_bytes()
    torch.manual_seed(0)
    hidden = torch.randn(INT8_HEAD_MAX_ROWS, plain.config.hidden_size).bfloat16()
    exact, approx = plain.logits(hidden), with_copy.logits(hidden)
    assert not torch.equal(exact, approx)  # it really read the int8 copy
    assert torch.equal(approx.argmax(-1), exact.argmax(-1))
    assert torch.equal(approx.max(-1).values, exact.max(-1).values)  # recomputed exactly, both ways
    full = hidden.float() @ plain.embed_tokens.weight.float().t()  # float32 logits of the real head
    torch.testing.assert_close(approx.max(-1).values, full.max(-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not bf16_tiles_fits(64, this_cpu()), reason="bf16 tiles need AVX512-BF16 and the native kernels")
def test_tiled_bf16_weights_serve_inference_and_agree_with_the_plain_matmul(tiny_hf_dir):
    """On AVX512-BF16 CPUs inference loads keep bf16 weights in 16-row tiles too: the calls run the
    tile kernels (few rows; AMX for more where the CPU has it), with float32 sums as the plain matmul,
    and autograd still multiplies the plain weight."""
    from miaotui.loaders.load import load_model

    plain = load_model(tiny_hf_dir, torch.bfloat16).model
    tiled = load_model(tiny_hf_dir, torch.bfloat16).model
    tiled.add_bf16_tiles()  # (LLM does this for bf16 inference)
    assert all(m.tiles is not None for m in tiled.modules() if isinstance(m, Linear))
    assert (tiled.lm_head_tiles is not None) == this_cpu().amx  # a tied head: tiles where AMX serves 9-64 rows
    assert tiled.weight_bytes() > plain.weight_bytes()
    torch.manual_seed(0)
    for rows in (1, 2, 5, 8, 16, 70):
        tokens = torch.randint(0, plain.config.vocab_size, (1, rows))
        positions = torch.arange(rows)[None]
        with torch.no_grad(), KernelLog() as log:
            got = tiled(tokens, positions)
        kernel = bf16_kernel(rows, 64, torch.bfloat16, torch.bfloat16, this_cpu())
        assert log.calls.get(f"bfloat16 linear {kernel or 'gemm'}", 0) >= 2 * 4  # every linear of both layers
        with torch.no_grad():
            torch.testing.assert_close(got, plain(tokens, positions), rtol=0.02, atol=0.03)
    layer = tiled.layers[0].mlp.down_proj  # with autograd the plain weight serves: gradients flow
    layer.weight.requires_grad_(True)
    layer(torch.randn(3, layer.in_features, dtype=torch.bfloat16)).sum().backward()
    assert layer.weight.grad is not None
