"""Calibration data and layer-by-layer activation capture for post-training compression.

Runs the model one decoder layer at a time over N samples x L tokens, so peak memory stays near
one layer's activations ([N, L, D]) rather than the whole network's. Not for the algorithms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from miaotui.compress.streamed import layers_of
from miaotui.data import default_skip, text_path
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.transformer import DecoderLayer, Transformer


@dataclass(slots=True)
class CalibrationSet:
    tokens: torch.Tensor  # [N, L] int64
    source: str
    sha256: str  # of the text file: recorded with the result so it can be reproduced


def load_calibration(path: str | Path | None, tokenizer: Tokenizer, samples: int = 128, seq_len: int = 512,
                     skip_tokens: int | None = None) -> CalibrationSet:
    """N consecutive, non-overlapping windows of L tokens from a text file (after skip_tokens).
    path None: the bundled WikiText-2 test split (miaotui/data), past its evaluated tokens."""
    path = text_path(path, "calibration file")
    skip_tokens = default_skip(path, skip_tokens)
    data = path.read_bytes()
    ids = tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)[skip_tokens:]
    need = samples * seq_len
    if len(ids) < need:
        raise MiaotuiError(f"calibration file '{path}' is too short: {len(ids):,} tokens, need "
                           f"{samples} x {seq_len} = {need:,} (lower --calib-samples or use a longer file)")
    tokens = torch.tensor(ids[:need]).reshape(samples, seq_len)
    return CalibrationSet(tokens, str(path), hashlib.sha256(data).hexdigest())


class HessianAccumulator:
    """H = 2/n * sum x x^T over the inputs a linear layer sees (x: [K]); GPTQ's and SparseGPT's H."""

    def __init__(self, in_features: int, keep_rows: int = 0) -> None:
        self.keep_rows = keep_rows  # also keep the first rows themselves (AWQ's grid search needs X)
        self.rows: list[torch.Tensor] = []
        self.kept = 0
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0
        self.abs_max = torch.zeros(in_features)  # per input channel: SmoothQuant's max|X_j|

    @torch.autocast("cpu", enabled=False)  # statistics in float32 even inside a bf16 calibration pass
    def add(self, x: torch.Tensor) -> None:
        if self.kept < self.keep_rows:
            take = x.reshape(-1, x.shape[-1])[: self.keep_rows - self.kept].float().clone()
            self.rows.append(take)
            self.kept += take.shape[0]
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.t() @ x).double()  # float32 GEMM per batch (fast), float64 running sum (exact enough)
        self.count += x.shape[0]
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))

    @property
    def samples(self) -> torch.Tensor:
        """The kept input rows [R, K]."""
        return torch.cat(self.rows) if self.rows else torch.empty(0)

    @property
    def hessian(self) -> torch.Tensor:
        return (2.0 * self.sum / max(self.count, 1)).float()


class StopForward(Exception):
    """Raised by a capture hook once the inputs it needs are seen: the rest of the layer need not run."""


def capture_inputs(layer: nn.Module, names: list[str], run: Callable[..., object],
                   keep_rows: int = 0, stop_early: bool = False) -> dict[str, HessianAccumulator]:
    """Run the layer over the calibration samples once (`run`: layer_by_layer's forward_all) with
    hooks that accumulate the inputs of layer.<name> for each name. stop_early: each sample's pass
    stops once the last of `names` (in execution order) has seen its input - re-capturing the
    down projection's inputs then skips nothing it needs, re-capturing q/k/v's skips the layer."""
    stats: dict[str, HessianAccumulator] = {}
    handles = []
    last_name = names[-1] if stop_early else None
    for name in names:
        module = layer.get_submodule(name)
        acc = stats[name] = HessianAccumulator(module.in_features, keep_rows)

        def hook(_m, args, _out, acc=acc, last=name == last_name) -> None:
            acc.add(args[0].detach())
            if last:
                raise StopForward

        handles.append(module.register_forward_hook(hook))
    try:
        run(stoppable=True) if stop_early else run()
    finally:
        for h in handles:
            h.remove()
    return stats


class LayerPasses:
    """One decoder layer run over every calibration sample, as it is at the moment of the call
    (layer_by_layer's forward_all): -> the outputs [n, S, D], or None when capture hooks stopped
    every pass early (stoppable). freeze_attention() marks the attention half as final (its linears
    quantized): its output, the residual stream the MLP half reads, is computed once, and the later
    passes run only the MLP half - the same numbers, without recomputing attention for each of the
    MLP's linears (GPTQ's true-sequential captures, the pass that feeds the next layer)."""

    def __init__(self, layer: nn.Module, current: torch.Tensor, ropes: dict, batch: int, bf16: bool) -> None:
        self.layer, self.current, self.batch, self.bf16 = layer, current, batch, bf16
        self.cos, self.sin = ropes[layer.rope_kind]
        self.mid: list[torch.Tensor] | None = None  # the residual stream after attention, per batch

    def __call__(self, stoppable: bool = False) -> torch.Tensor | None:
        outs = []
        for b, i in enumerate(range(0, self.current.shape[0], self.batch)):
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    if self.mid is not None:
                        outs.append(self.layer.mlp_block(self.mid[b]))
                    else:
                        outs.append(self.layer(self.current[i:i + self.batch], self.cos, self.sin, None))
            except StopForward:  # a capture hook saw what it needed (capture_inputs)
                if not stoppable:
                    raise
        return torch.cat(outs) if outs else None

    def freeze_attention(self) -> None:
        if self.mid is not None or not hasattr(self.layer, "attention_block"):
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            self.mid = [self.layer.attention_block(self.current[i:i + self.batch], self.cos, self.sin, None)
                        for i in range(0, self.current.shape[0], self.batch)]


@torch.inference_mode()
def layer_by_layer(model: Transformer, calib: CalibrationSet, desc: str, batch: int = 8, keep: bool = True
                   ) -> Iterator[tuple[int, DecoderLayer, LayerPasses]]:
    """Yield (index, layer, forward_all) for each decoder layer in order.

    forward_all() runs the layer (as it is at that moment) over every calibration sample and
    returns the outputs (LayerPasses); after the caller has modified the layer, the generator feeds
    the *modified* layer's outputs to the next layer, so errors propagate as they will at inference.
    A streamed model (compress/streamed.py) holds one float32 layer at a time: each is then kept
    compact (keep) or released (a pass that only gathers statistics); a bf16 checkpoint's passes
    run under bf16 autocast where the CPU has native bf16 (LayerStore.calibration_dtype).
    """
    n, seq = calib.tokens.shape
    positions = torch.arange(seq)[None]
    ropes = model.rope_tables(positions, model.dtype)
    hidden = torch.cat([model.embed(calib.tokens[i:i + batch]) for i in range(0, n, batch)])

    store = layers_of(model)
    bf16 = store.calibration_dtype == torch.bfloat16  # a streamed bf16 checkpoint on a bf16-native CPU
    for index in tqdm(range(len(model.layers)), desc=desc, unit="layer"):
        layer = store.load(index)  # float32; read from the checkpoint if the model is streamed
        forward_all = LayerPasses(layer, hidden, ropes, batch, bf16)
        yield index, layer, forward_all
        hidden = forward_all()
        if keep:
            store.done(index)
        else:
            store.release(index)


def prepare_weight_and_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies for GPTQ/SparseGPT: inputs that never fire (H_jj = 0) get H_jj = 1 and a zero weight."""
    w, h = weight.detach().float().clone(), hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U: row i holds column i's
    update coefficients. With P the order-reversing permutation and P H P = L L^T (lower Cholesky),
    H^-1 = (P L^-T P)(P L^-1 P), and U = P L^-1 P is upper triangular with a positive diagonal: one
    Cholesky and one triangular inverse (2/3 k^3 flops) instead of Cholesky, inverse and Cholesky
    again - minutes saved on an 8B model's 14336-wide down projections."""
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    return lower_triangular_inverse(torch.linalg.cholesky(h.flip(0, 1))).flip(0, 1)


def lower_triangular_inverse(lower: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """L^-1 of a lower-triangular L [k, k], by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1,
    C^-1]]. k^3 / 3 flops, mostly in GEMMs: a 14336-wide factor in 8 s on 2 cores where a triangular
    solve against the identity (k^3 flops) takes 12 s."""
    k = lower.shape[0]
    if k <= block:
        return torch.linalg.solve_triangular(lower, torch.eye(k, dtype=lower.dtype), upper=False)
    half = k // 2
    a_inv = lower_triangular_inverse(lower[:half, :half], block)
    c_inv = lower_triangular_inverse(lower[half:, half:], block)
    out = torch.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = c_inv
    out[half:, :half] = -(c_inv @ (lower[half:, :half] @ a_inv))
    return out
