"""The decoder-only transformer every family is (models/registry.py): embedding, decoder layers of
the shared blocks (layers/) as the ModelConfig switches them on, final norm, output head.

Not for generation logic (the engine drives forward() with its own KV cache and positions) or for
checkpoint names (the model files).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.kernels import native_op
from miaotui.layers.attention import Attention
from miaotui.layers.kernel_choice import (
    bf16_tiles_fits,
    note_kernel,
    q_tiles_fits,
    q_tiles_format_fits,
    quant_kernel,
    this_cpu,
)
from miaotui.layers.linear import Linear, bf16_tiles_layout, make_linear, mixed_linear
from miaotui.layers.mlp import GatedMLP
from miaotui.layers.moe import MoE
from miaotui.layers.norm import RMSNorm
from miaotui.layers.quant_formats import QuantFormat, QuantizedTensor, compute_qparams, quantize_codes
from miaotui.layers.quantized_embedding import QuantEmbedding
from miaotui.layers.quantized_linear import QTiles, QuantLinear, q_tiles_layout
from miaotui.layers.rope import RotaryEmbedding
from miaotui.loaders.gguf_quant import GGUFBlocks
from miaotui.models.config import ModelConfig
from miaotui.models.fused_decode import FusedDecode
from miaotui.models.registry import model_tensors
from miaotui.runtime import release_freed_memory

RESCORED_CANDIDATES = 8  # logits recomputed in float32 per position (Transformer.logits)
INT8_HEAD_MAX_ROWS = 4  # up to here the int8 head copy beats the bf16 head (docs/kernels.md)
HEAD_Q_MAX_ROWS = 8  # and with the native few-row kernel (docs/kernels.md)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; the families' variants by config: norms on
    the blocks' outputs too (Gemma), a mixture of experts for the MLP, a sliding window."""

    def __init__(self, config: ModelConfig, index: int = 0) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(d, eps)  # the MLP's input norm (Llama's name for it)
        if config.is_moe(index):
            self.mlp = MoE(d, config.moe_intermediate_size, config.num_experts, config.experts_per_token,
                           config.norm_topk_prob, config.hidden_act)
        else:
            self.mlp = GatedMLP(d, config.intermediate_size, config.hidden_act)
        # Gemma 2/3 normalise each block's output before its residual add
        self.attn_out_norm = RMSNorm(d, eps) if config.sandwich_norms else None
        self.mlp_out_norm = RMSNorm(d, eps) if config.sandwich_norms else None
        self.rope_kind = "local" if config.local_rope(index) else "global"

    def forward(self, x, cos, sin, kv_view) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x, cos, sin, kv_view))

    def attention_block(self, x, cos, sin, kv_view) -> torch.Tensor:
        """x [B, S, D] -> x + the attention block's output: the residual stream the MLP block reads."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_view)
        return x + (h if self.attn_out_norm is None else self.attn_out_norm(h))

    def mlp_block(self, x) -> torch.Tensor:
        """The residual stream after attention [B, S, D] -> the layer's output."""
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if self.mlp_out_norm is None else self.mlp_out_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # built on the meta device and then assigned (loaders): no random init to run (on meta it
        # would import PyTorch's reference ops, ~2 s)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else make_linear(
            config.hidden_size, config.vocab_size, False
        )
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        # Gemma 3's sliding layers rotate with their own base and no scaling
        self.rotary_local = None if config.local_rope_theta is None else RotaryEmbedding(
            config.rotary_dim, config.local_rope_theta, None, config.max_position_embeddings)
        self.lm_head_narrow: torch.Tensor | None = None  # decode copy of a tied head
        self.head_int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes [V, D], row scales [V])
        # The same int8 head for the native few-row kernels (layers/kernel_choice.py), where they run:
        # rows_q: (codes + 127 [V, D] uint8, scale [V, 1], offset -127 * scale [V, 1]) float32;
        # tiles_q: those in q_tiles_layout
        self.head_q: tuple[torch.Tensor, ...] | QTiles | None = None
        self.head_q_kernel, self.head_q_rows = "rows_q", 0
        self.lm_head_tiles: torch.Tensor | None = None  # bf16_tiles_layout of a tied bf16 head
        self.fused_decode = FusedDecode()  # decode steps of the layers in one native op, where they fit

    def materialize_rotary(self, device: str | torch.device) -> None:
        """The rope buffer is derived from the config, never stored: compute it after a meta-device build."""
        for rotary in (self.rotary, self.rotary_local):
            if rotary is not None:
                rotary.materialize(device)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """positions [B, S] -> {layer.rope_kind: (cos, sin) [B, 1, S, rot]}: each layer runs
        layer(x, *tables[layer.rope_kind], kv_view)."""
        tables = {"global": self.rotary(positions, dtype)}
        if self.rotary_local is not None:
            tables["local"] = self.rotary_local(positions, dtype)
        return tables

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D], scaled where the family scales them (Gemma: sqrt(D), in the
        activations' dtype as the reference rounds it)."""
        x = self.embed_tokens(tokens)
        scale = self.config.embed_scale
        return x if scale is None else x * torch.tensor(scale, dtype=x.dtype)

    def add_decode_weights(self, dtype: torch.dtype) -> None:
        """Keep a narrow copy of every matmul weight for memory-bound few-row calls (linear.py).
        int8: a copy of the output head only (see logits): int8 body weights would change the model."""
        if dtype == torch.int8:
            self._add_int8_head()
            return
        for module in self.modules():
            if isinstance(module, Linear):
                module.add_narrow_weight(dtype)
        if self.lm_head is None and self._dense_head() is not None:
            self.lm_head_narrow = self.embed_tokens.weight.detach().to(dtype)

    def add_bf16_tiles(self) -> None:
        """Keep every bf16 matmul weight in 16-row tiles too, for inference on AVX512-BF16 CPUs
        (layers/linear.py): decode-sized calls stream them at memory speed, and AMX multiplies them
        in place for longer calls. A tied head gets tiles on AMX CPUs only: elsewhere they would serve
        only 5-8 row calls (up to 4 read the int8 head copy, more PyTorch's GEMM)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.add_bf16_tiles()
        head = self._dense_head()
        if self.lm_head is None and head is not None and head.dtype == torch.bfloat16 and this_cpu().amx \
                and bf16_tiles_fits(head.shape[1], this_cpu()) and head.device.type == "cpu":
            self.lm_head_tiles = bf16_tiles_layout(head)

    def _add_int8_head(self) -> None:
        head = self._dense_head()
        if head is None:
            return
        fmt = QuantFormat(8, -1, True)  # per output row, symmetric: the int8pack kernel's format
        scale, zero = compute_qparams(head.detach(), fmt)
        codes = quantize_codes(head.detach(), scale, zero, fmt)
        kernel = quant_kernel(fmt, head.shape[1], head.shape[0], 1, head.dtype, this_cpu()) \
            if head.device.type == "cpu" else "int8pack"
        if kernel in ("rows_q", "tiles_q"):
            scale = scale.float().contiguous()
            stored = (codes.to(torch.int16) + 127).to(torch.uint8)  # w = stored * scale - 127 * scale
            offset = (-127 * scale).contiguous()
            self.head_q_kernel, self.head_q_rows = kernel, head.shape[0]  # (a tensor-parallel shard's rows)
            self.head_q = (stored, scale, offset) if kernel == "rows_q" else q_tiles_layout(stored, 8, scale, offset)
        else:
            self.head_int8 = codes, scale[:, 0].to(head.dtype).contiguous()

    def _dense_head(self) -> torch.Tensor | None:
        """The output head's weight [V, D], or None when it is quantized (its kernels decide)."""
        head = getattr(self.embed_tokens if self.lm_head is None else self.lm_head, "weight", None)
        return head if isinstance(head, torch.Tensor) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, kv_views: list | None = None
                      ) -> torch.Tensor:
        """tokens, positions: [B, S] -> final normed hidden states [B, S, D].

        kv_views: one paged-cache view per layer for an engine step (engine/step.py), or None:
        plain causal attention over the given tokens alone (perplexity, calibration, training)."""
        x = self.embed(tokens)
        ropes = self.rope_tables(positions, x.dtype)
        cos, sin = ropes["global"]
        if self.fused_decode.step_fits(x, cos, kv_views):
            return self.norm(self.fused_decode.run(self.layers, x, ropes, kv_views))
        for i, layer in enumerate(self.layers):
            x = layer(x, *ropes[layer.rope_kind], None if kv_views is None else kv_views[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., D] -> logits [..., V] in float32 (sampling and log-probs want fp32), soft-capped
        where the family caps them (Gemma 2: cap * tanh(logits / cap), after the exact rescoring)."""
        logits = self._head_logits(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        quantized = self.embed_tokens.table if self.lm_head is None and isinstance(self.embed_tokens, QuantEmbedding) \
            else self.lm_head if isinstance(self.lm_head, QuantLinear) else None
        if quantized is not None:  # a head in its own integer bits (a GGUF file's)
            return self._quantized_logits(quantized, hidden, rows)
        if self.head_q is not None and rows <= HEAD_Q_MAX_ROWS and hidden.dtype == torch.bfloat16:
            note_kernel("int8 head", self.head_q_kernel)
            x = hidden.reshape(rows, -1).contiguous()
            if self.head_q_kernel == "tiles_q":
                out = self.head_q(x, self.head_q_rows, 8, hidden.shape[-1], None)
            else:
                out = native_op("linear_q_rows")(x, *self.head_q, 8, hidden.shape[-1], None)
            out = out.view(*hidden.shape[:-1], -1)
        elif self.head_int8 is not None and rows <= INT8_HEAD_MAX_ROWS and hidden.dtype != torch.float32:
            # Memory-bound few-row calls read the int8 copy (1 row: 0.66 vs 1.79 ms for the bf16
            # head, docs/kernels.md); the best candidates are then recomputed exactly below, so
            # greedy picks are those of the real head.
            codes, scale = self.head_int8
            out = torch._weight_int8pack_mm(hidden.reshape(rows, -1).contiguous(), codes, scale)
            out = out.view(*hidden.shape[:-1], -1)
        elif self.lm_head is None:
            out = mixed_linear(hidden, self.embed_tokens.weight, None, self.lm_head_narrow, self.lm_head_tiles)
        else:
            out = self.lm_head(hidden)
        if out.dtype in (torch.bfloat16, torch.float16):
            return self._rescore_top(hidden, out.float())
        return out.float()

    def _quantized_logits(self, head: QuantLinear, hidden: torch.Tensor, rows: int) -> torch.Tensor:
        """Logits from an integer head [V, D]. Few rows: its few-row kernel with float32 activations
        and output (no bf16 rounding of the logits; the activations keep their int8 residual). More:
        the GEMM in the activations' dtype, best candidates rescored exactly (_rescore_top)."""
        x = hidden.reshape(rows, -1)
        if head.kernel_for(rows, torch.float32) == "tiles_q":
            return head(x.float()).view(*hidden.shape[:-1], -1)
        logits = head(x).float().view(*hidden.shape[:-1], -1)
        if hidden.dtype in (torch.bfloat16, torch.float16):
            return self._rescore_top(hidden, logits, lambda top: head.weight_rows(top, torch.float32)
                                     .view(*top.shape, -1))
        return logits

    def _rescore_top(self, hidden: torch.Tensor, logits: torch.Tensor, head_rows=None) -> torch.Tensor:
        """A bf16 GEMM rounds its output: logits near 16 land on a 0.125 grid, so close candidates
        tie and greedy picks would follow rounding (and flip between batch shapes). Recompute the
        top candidates exactly in float32 from the same weights: argmax is then exact, for the
        price of RESCORED_CANDIDATES dot products per position. hidden: [..., D], logits: [..., V];
        head_rows(top [..., C]) -> [..., C, D] float32: a quantized head's rows (default: the dense head's)."""
        head = self._dense_head()
        if head_rows is None:
            if head is None or head.dtype not in (torch.bfloat16, torch.float16):
                return logits  # an int8 head copy: its own kernels decide the precision
            head_rows = lambda top: head[top].float()  # noqa: E731
        native = native_op("top_candidates") if logits.device.type == "cpu" else None
        if native is not None:  # one parallel pass (torch.topk: ~1 ms for 16 rows of 49152 here)
            top = native(logits.view(-1, logits.shape[-1]), RESCORED_CANDIDATES).view(*logits.shape[:-1], -1)
        else:
            top = logits.topk(RESCORED_CANDIDATES, dim=-1).indices  # [..., C]
        exact = (head_rows(top) @ hidden.float().unsqueeze(-1)).squeeze(-1)  # [..., C, D] @ [..., D, 1]
        return logits.scatter_(-1, top, exact)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_views: list | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V], or [B, V] for the last position only."""
        hidden = self.hidden_states(tokens, positions, kv_views)
        return self.logits(hidden[:, -1] if last_only else hidden)

    def num_parameters(self) -> int:
        """Logical weights: a quantized matrix counts its out x in entries, not its packed bytes."""
        quantized = [m for m in self.modules() if isinstance(m, QuantLinear)]
        return sum(p.numel() for p in self.parameters()) + sum(
            m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel()) for m in quantized)

    def decode_read_bytes(self) -> int:
        """Bytes of weights one single-row decode step reads (each matrix once, in the copy its
        few-row kernel uses; one embedding row and the norms are left out): bytes x steps/s is the
        memory traffic a decode achieves, as gpt-fast reports it."""
        from miaotui.layers.linear import NARROW_MATMUL_MAX_ROWS

        total = 0
        for module in self.layers.modules():
            if isinstance(module, QuantLinear):
                total += sum(t.numel() * t.element_size() for t in module.decode_tensors())
            elif isinstance(module, Linear):
                narrow = module.narrow_weight is not None and NARROW_MATMUL_MAX_ROWS >= 1
                weight = module.tiles if module.tiles is not None else module.narrow_weight if narrow else module.weight
                total += weight.numel() * weight.element_size()
        head = self._head_q_tensors() or self.head_int8 or (
            None if self.lm_head_narrow is None else (self.lm_head_narrow,))
        if head is None and self.lm_head is None and isinstance(self.embed_tokens, QuantEmbedding):
            head = self.embed_tokens.table.decode_tensors()
        if head is None:
            module = self.embed_tokens if self.lm_head is None else self.lm_head
            head = (*module.buffers(), *module.parameters())
        return total + sum(t.numel() * t.element_size() for t in head)

    def _head_q_tensors(self) -> list[torch.Tensor] | None:
        return None if self.head_q is None else \
            self.head_q.tensors() if isinstance(self.head_q, QTiles) else list(self.head_q)

    def weight_bytes(self) -> int:
        """Bytes of all weights held, decode copies included."""
        tensors = list(self.parameters()) + [b for n, b in self.named_buffers() if "inv_freq" not in n]
        tensors += [m.narrow_weight for m in self.modules() if isinstance(m, Linear) and m.narrow_weight is not None]
        if self.lm_head_narrow is not None:
            tensors.append(self.lm_head_narrow)
        for copy in (self.head_int8, self._head_q_tensors()):
            tensors += [] if copy is None else list(copy)
        tensors += [t for m in self.modules() if isinstance(m, QuantLinear) for t in m.kernel_tensors()]
        tensors += [m.tiles for m in self.modules() if isinstance(m, Linear) and m.tiles is not None]
        tensors += [] if self.lm_head_tiles is None else [self.lm_head_tiles]
        return sum(t.numel() * t.element_size() for t in tensors)


def build_transformer(config: ModelConfig, hf_tensors: dict[str, torch.Tensor | QuantizedTensor],
                      dtype: torch.dtype, device: str | torch.device = "cpu", layout_only: bool = False
                      ) -> Transformer:
    """Build the model from Hugging Face-named tensors, fusing q/k/v and gate/up.

    Built on the meta device first so no random initialisation runs, then weights are assigned. A
    matrix given as a QuantizedTensor (a GGUF file's own blocks) becomes a QuantLinear in its
    format, packed from its codes with no float copy.
    layout_only: those layers keep the decode kernel's layout alone (QuantLinear.keep_kernel_layout_only),
    and so does a quantized embedding table (QuantEmbedding; else it is dequantized).
    """
    with torch.device("meta"):
        model = Transformer(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model_tensors(config, hf_tensors):  # one at a time: each to its final form
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(tensor, GGUFBlocks):
            tiles_run = layout_only and str(device) == "cpu" and q_tiles_fits(this_cpu()) \
                and q_tiles_format_fits(tensor.fmt, tensor.k) and native_op("dequantize_q_tiles") is not None
            table = QuantEmbedding.from_tiles(*tensor.shape, tensor.fmt, tensor.tiles(), dtype) \
                if tiles_run and name == "embed_tokens.weight" and native_op("embedding_q_tiles") is not None \
                else None
            if table is not None:
                model.embed_tokens = table
                continue
            if tiles_run and isinstance(module, Linear) and leaf == "weight":
                # the file's blocks straight into the tile kernel's layout (one pass, no codes unpacked)
                with torch.device("meta"):
                    layer = QuantLinear(module.in_features, module.out_features, module.bias is not None, tensor.fmt)
                layer.set_packed_tiles(*tensor.tiles())
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
                del tensor
                continue
            tensor = tensor.quantized()
        if isinstance(tensor, QuantizedTensor):
            table = QuantEmbedding.from_quantized(tensor, dtype) \
                if name == "embed_tokens.weight" and layout_only and str(device) == "cpu" else None
            if table is not None:
                model.embed_tokens = table
                continue
            if not (isinstance(module, Linear) and leaf == "weight" and str(device) == "cpu"):
                tensor = tensor.dequantize()  # the embedding table, off the tile kernel's CPUs; off the CPU
            else:
                with torch.device("meta"):  # set_codes gives it its real tensors
                    layer = QuantLinear(module.in_features, module.out_features, module.bias is not None, tensor.fmt,
                                        tensor.act_quant)
                layer.set_codes(tensor.codes, tensor.scale, tensor.zero, None, layout_only)
                layer.set_input_order(tensor.input_order)
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
                del tensor
                release_freed_memory()  # the codes' temporaries, before the next tensor is read
                continue
        if isinstance(module, QuantLinear):  # its bias
            module.bias = tensor.float().contiguous()
            continue
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta and "inv_freq" not in n]
    if left:
        raise MiaotuiError(f"checkpoint is missing {len(left)} tensors, e.g. '{left[0]}'")
    model.materialize_rotary(device)
    return model.eval().requires_grad_(False)
