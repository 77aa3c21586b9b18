"""GGUF quants run in their own bits: each block type with an exact integer mapping loads into
QuantLinear with no float copy (loaders/gguf_quant.py), and gives the float path's answers."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from miaotui.errors import MiaotuiError
from miaotui.eval.perplexity import decode_perplexity, perplexity
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.gguf_quant import NATIVE_TYPES, native_weight
from miaotui.loaders.load import load_model
from tests.tiny_models import write_gguf_from_hf_dir, write_hf_dir

EXPECTED_FORMAT = {T.Q4_0: QuantFormat(4, 32, True), T.Q4_1: QuantFormat(4, 32, False),
                   T.Q8_0: QuantFormat(8, 32, True), T.Q4_K: QuantFormat(4, 32, False),
                   T.Q5_0: QuantFormat(8, 32, True), T.Q5_1: QuantFormat(8, 32, False),
                   T.Q5_K: QuantFormat(8, 32, False), T.Q6_K: QuantFormat(8, 16, True),
                   T.Q3_K: QuantFormat(8, 16, True), T.Q2_K: QuantFormat(8, 16, False)}
HALF_FIELDS = {T.Q6_K: (208,), T.Q3_K: (108,), T.Q2_K: (80, 82), T.Q4_0: (0,), T.Q8_0: (0,), T.Q5_0: (0,)}
LINEARS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
           "ffn_up.weight", "ffn_down.weight")
IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]


def _random_blocks(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in qtype's blocks [n, bytes per row], with finite float16 scales (and mins)."""
    per_block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // per_block, size), dtype=np.uint8)
    for start in HALF_FIELDS.get(qtype, (0, 2)):
        scales = (rng.uniform(0.5, 2.0, size=raw.shape[:2]) * 1e-3).astype(np.float16)
        scales[0, 0] = 0  # a group with scale 0 holds its offset alone
        raw[..., start:start + 2] = scales[..., None].view(np.uint8)
    if qtype == T.Q8_0:
        raw[..., 2:][raw[..., 2:] == 128] = 129  # int8 code -128: see the next test
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_blocks_map_exactly_onto_integer_formats(qtype):
    raw = _random_blocks(qtype, 24, 512, np.random.default_rng(0))
    native = native_weight(raw, qtype, 512)
    assert native.fmt == EXPECTED_FORMAT[qtype] and native.codes.shape == (24, 512)
    assert native.codes.dtype == (torch.int8 if native.fmt.symmetric else torch.uint8)
    reference = gguf.quants.dequantize(raw, qtype)
    got = native.dequantize().numpy()
    assert np.abs(got - reference).max() <= 1e-6 * np.abs(reference).max()  # float32 rounding of zero * scale


def test_types_without_an_exact_mapping_are_left_to_dequantize():
    rng = np.random.default_rng(1)
    raw = _random_blocks(T.Q8_0, 4, 256, rng)
    raw[0, 2] = 128  # code -128: int8 g32 symmetric holds -127..127
    assert native_weight(raw, T.Q8_0, 256) is None
    iq = rng.integers(0, 256, size=(4, 256 // 32 * GGML_QUANT_SIZES[T.IQ4_NL][1]), dtype=np.uint8)
    assert native_weight(iq, T.IQ4_NL, 256) is None  # dequantized by the loader


@pytest.fixture(scope="module")
def k_hf_dir(tmp_path_factory):
    # K-quants need rows in whole 256-wide super-blocks; 32-wide heads for the fused decode layer
    return write_hf_dir(tmp_path_factory.mktemp("k-hf"), hidden_size=256, intermediate_size=512,
                        num_attention_heads=8, num_key_value_heads=4)


def _logits(loaded, ids=IDS) -> torch.Tensor:
    tokens = torch.tensor([ids])
    return loaded.model(tokens, torch.arange(len(ids))[None]).float()[0]


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_quantized_gguf_loads_in_its_own_bits_with_the_float_paths_logits(k_hf_dir, tmp_path, qtype):
    path = write_gguf_from_hf_dir(k_hf_dir, tmp_path / f"{qtype.name}.gguf", quant={s: qtype for s in LINEARS})
    native = load_model(path, torch.float32, keep_quantized=True)
    fmt = EXPECTED_FORMAT[qtype]
    for layer in native.model.layers:
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(module, QuantLinear) and module.fmt == fmt
            # the codes in their own bits: no float weight is held
            assert module.packed.numel() == module.out_features * module.in_features * fmt.storage_bits // 8
            assert not any(t.is_floating_point() and t.numel() >= module.packed.numel() for t in module.buffers())
    reference = load_model(path, torch.float32, keep_quantized=False)  # the same weights, dequantized
    assert isinstance(reference.model.layers[0].self_attn.qkv_proj, Linear)
    # float32 activations: the few-row kernels take the activations' int8 residual too
    for ids in (IDS, IDS[:1]):
        got, want = _logits(native, ids), _logits(reference, ids)
        assert float((got - want).abs().max() / want.abs().max()) < 2e-3
    assert load_model(path, torch.bfloat16).format == "gguf"  # inference dtype: native by default
    assert isinstance(load_model(path, torch.bfloat16).model.layers[0].mlp.down_proj, QuantLinear)


def test_a_fused_layer_of_mixed_types_takes_one_format_holding_both(k_hf_dir, tmp_path):
    # as in a Q4_K_M file: v (and some down) in Q6_K beside Q4_K
    quant = {s: T.Q4_K for s in LINEARS} | {"attn_v.weight": T.Q6_K, "ffn_down.weight": T.Q6_K}
    path = write_gguf_from_hf_dir(k_hf_dir, tmp_path / "mixed.gguf", quant=quant)
    native = load_model(path, torch.float32, keep_quantized=True)
    layer = native.model.layers[0]
    # Q4_K q, k beside Q6_K v: one layer holds one format, 8-bit codes in asymmetric groups of 16 hold both
    assert layer.self_attn.qkv_proj.fmt == QuantFormat(8, 16, False)
    assert layer.self_attn.o_proj.fmt == layer.mlp.gate_up_proj.fmt == QuantFormat(4, 32, False)
    assert layer.mlp.down_proj.fmt == QuantFormat(8, 16, True)
    reference = load_model(path, torch.float32, keep_quantized=False)
    got, want = _logits(native), _logits(reference)
    assert float((got - want).abs().max() / want.abs().max()) < 2e-3


def test_inference_holds_each_weight_once_in_the_kernel_layout(k_hf_dir, tmp_path):
    """`miaotui run` / `serve` (LLM, one process): integer layers keep the tile kernel's layout alone,
    the quantized embedding table stays quantized and serves as the tied head."""
    from miaotui import LLM
    from miaotui.layers.kernel_choice import q_tiles_fits, this_cpu
    from miaotui.layers.quantized_embedding import QuantEmbedding

    if not q_tiles_fits(this_cpu()):
        pytest.skip("the tile kernel needs AVX512-VNNI: elsewhere layers keep their packed codes")
    quant = {s: T.Q4_K for s in LINEARS} | {"ffn_down.weight": T.Q6_K, "token_embd.weight": T.Q6_K}
    path = write_gguf_from_hf_dir(k_hf_dir, tmp_path / "q4_k_m-like.gguf", quant=quant)
    llm = LLM(str(path), dtype="bfloat16")
    model = llm.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.table.fmt == QuantFormat(8, 16, True)
    for layer in model.layers:
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert module.packed is None and module.scale is None
            assert module.kernel_tensors() == module._q_tiles.tensors()
            with pytest.raises(MiaotuiError, match="dtype float32"):
                module.codes()
    # what is held: the tiles (4-bit: 16 bytes a 32-row, + 2 float16 per group) and the small float tensors
    reference = load_model(path, torch.float32, keep_quantized=False).model
    linear_weights = sum(m.weight.numel() for m in reference.modules() if isinstance(m, Linear))
    embedding = reference.embed_tokens.weight.numel()
    assert model.weight_bytes() < 0.75 * linear_weights + 1.2 * embedding + 64 * 1024
    ids = torch.tensor([IDS])
    want = reference(ids, torch.arange(len(IDS))[None]).float()[0]
    got = model(ids, torch.arange(len(IDS))[None]).float()[0]  # prefill: the tiles dequantized for a bf16 GEMM
    assert float((got - want).abs().max() / want.abs().max()) < 3e-2  # bf16 activations
    rows = model.embed_tokens(torch.tensor([[0, 17, 255]]))
    torch.testing.assert_close(rows[0].float(), reference.embed_tokens.weight[[0, 17, 255]], rtol=1e-2, atol=1e-3)
    # decode steps (the few-row kernels, the fused layer, the head's float32 logits) score as the float path
    ids = IDS * 4
    decoded = decode_perplexity(model, ids, ctx=24, progress=False).ppl
    floats = perplexity(reference, ids, ctx=24, score_from=12, progress=False).ppl
    assert abs(decoded / floats - 1) < 2e-2, (decoded, floats)


def test_a_model_larger_than_the_memory_available_is_a_clear_error_before_loading(k_hf_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    from miaotui.loaders import memory

    path = write_gguf_from_hf_dir(k_hf_dir, tmp_path / "q4_0.gguf", quant={s: T.Q4_0 for s in LINEARS})
    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000)  # 0.1 MB
    for target in (path, k_hf_dir):
        with pytest.raises(MiaotuiError, match=r"needs about .* GB of memory .* available"):
            load_model(target, torch.bfloat16)
    monkeypatch.undo()
    assert load_model(path, torch.bfloat16).format == "gguf"
    # the CLI: one line, exit code 2 (a file whose header claims more than any machine has)
    huge = tmp_path / "huge.gguf"
    writer = gguf.GGUFWriter(str(huge), "llama")
    for key, value in (("llama.block_count", 1), ("llama.embedding_length", 64), ("llama.feed_forward_length", 64),
                       ("llama.attention.head_count", 4), ("llama.context_length", 64)):
        writer.add_uint32(key, value)
    writer.add_tensor_info("token_embd.weight", (2**22, 2**22), np.dtype(np.float32), 2**46)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    done = subprocess.run([sys.executable, "-m", "miaotui.cli", "info", "-m", str(huge)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "truncated" in done.stderr or "memory" in done.stderr


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_blocks_go_straight_to_the_tile_layout(qtype):
    """An inference load lays Q4_0 / Q4_1 / Q8_0 blocks out for the tile kernel in one pass
    (gguf_q_tiles): the same tiles, and the same weights, as unpacking the codes first."""
    from miaotui.kernels import native_op
    from miaotui.layers.kernel_choice import q_tiles_fits, this_cpu
    from miaotui.loaders.gguf_quant import GGUFBlocks

    if native_op("gguf_q_tiles") is None or not q_tiles_fits(this_cpu()):
        pytest.skip("the tile kernel runs on AVX-512 VNNI CPUs")
    raw = _random_blocks(qtype, 40, 512, np.random.default_rng(3))  # 40 rows: a padded last tile
    blocks = GGUFBlocks(qtype, raw, 512)
    via_codes = native_weight(raw, qtype, 512)
    fast, slow = QuantLinear(512, 40, False, blocks.fmt), QuantLinear(512, 40, False, blocks.fmt)
    fast.set_packed_tiles(*blocks.tiles())
    slow.set_codes(via_codes.codes, via_codes.scale, via_codes.zero, None, layout_only=True)
    assert fast.packed is None and slow.packed is None  # both hold the tiles alone
    assert torch.equal(fast._q_tiles.tiles, slow._q_tiles.tiles)
    assert fast._q_tiles.zero_code == slow._q_tiles.zero_code
    assert fast._q_tiles.exponent == slow._q_tiles.exponent
    if qtype != T.Q4_1:  # (Q4_1's offset is the block's own m, not -zero * scale rounded back)
        assert torch.equal(fast._q_tiles.meta, slow._q_tiles.meta)
    torch.testing.assert_close(fast.dequantized_weight(), torch.from_numpy(gguf.quants.dequantize(raw, qtype)),
                               rtol=1e-3, atol=1e-6)  # (the float16 meta of Q4_1's offsets)
    x = torch.randn(3, 512)
    torch.testing.assert_close(fast(x), slow(x), rtol=2e-3, atol=1e-4)


def test_an_inference_load_takes_the_blocks_path(k_hf_dir, tmp_path):
    from miaotui.layers.kernel_choice import q_tiles_fits, this_cpu
    from miaotui.layers.quantized_embedding import QuantEmbedding

    if not q_tiles_fits(this_cpu()):
        pytest.skip("the tile kernel runs on AVX-512 VNNI CPUs")
    quant = {s: T.Q4_0 for s in LINEARS} | {"token_embd.weight": T.Q8_0}
    path = write_gguf_from_hf_dir(k_hf_dir, tmp_path / "q40.gguf", quant=quant)
    fast = load_model(path, torch.float32, keep_quantized=True, layout_only=True)
    slow = load_model(path, torch.float32, keep_quantized=True)
    assert isinstance(fast.model.embed_tokens, QuantEmbedding)
    layer = fast.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, QuantLinear) and layer.packed is None and layer.fmt == QuantFormat(4, 32, True)
    for ids in (IDS, IDS[:1]):
        got, want = _logits(fast, ids), _logits(slow, ids)
        assert float((got - want).abs().max() / want.abs().max()) < 2e-3
