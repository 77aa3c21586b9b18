"""Compression and parallelism on every family: quantization (GPTQ, RTN int4 g32), pruning (Wanda
50%, structured channels and experts) run and reload; the scale folds of AWQ and SmoothQuant keep
each family's float function; tensor and pipeline parallelism equal one process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from miaotui.compress.calibration import load_calibration
from miaotui.layers.quant_formats import QuantFormat
from miaotui.loaders.load import load_model
from miaotui.models.plan import layer_plan, model_linears
from tests.tiny_models import FAMILY_CONFIGS

FAMILIES = sorted(FAMILY_CONFIGS)
MOE = ("mixtral", "qwen3_moe")
ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]])


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS, torch.arange(IDS.shape[1])[None])


def _similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the centred logits of each position."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@pytest.mark.parametrize("method", ["gptq", "rtn", "wanda"])
@pytest.mark.parametrize("name", FAMILIES)
def test_compress_each_family_and_reload(family_dir, calib_text, tmp_path, name, method):
    from miaotui.compress.prune.unstructured import prune_model
    from miaotui.compress.quantize.apply import quantize_model
    from miaotui.loaders.miaotui_dir import save_model

    loaded = load_model(family_dir(name), torch.float32)
    reference = _logits(loaded.model)
    calib = load_calibration(calib_text, loaded.tokenizer, 8, 32)
    if method == "wanda":
        record = prune_model(loaded.model, "wanda", 0.5, calib=calib)
        out = save_model(loaded.model, loaded.tokenizer, tmp_path / "m", stages=[record.to_dict()])
        sparsity = [float((loaded.model.get_submodule(n).weight == 0).float().mean())
                    for n in model_linears(loaded.config)]
        assert min(sparsity) >= 0.5
    else:
        record = quantize_model(loaded.model, method, QuantFormat(4, 32, False), calib)
        assert sorted(record.layers) == sorted(model_linears(loaded.config))  # every expert too, no router
        out = save_model(loaded.model, loaded.tokenizer, tmp_path / "m", record.to_dict())
    compressed = _logits(loaded.model)
    again = load_model(out, torch.float32)
    torch.testing.assert_close(_logits(again.model), compressed)
    # still the same model, roughly (random weights: pruning half of them moves more than rounding)
    similarity = _similarity(compressed, reference)
    assert similarity >= (0.5 if method == "wanda" else 0.9)


@pytest.mark.parametrize("name", FAMILIES)
def test_scale_folds_keep_each_family_float_function(family_dir, name):
    """SmoothQuant's and AWQ's folds (norm -> q/k/v; norm -> router and every expert; up rows -> down)."""
    from miaotui.compress.quantize.smoothquant import smooth_layer

    loaded = load_model(family_dir(name), torch.float32)
    model = loaded.model
    x = torch.randn(1, 12, loaded.config.hidden_size)
    ropes = model.rope_tables(torch.arange(12)[None], torch.float32)
    for i, original in enumerate(model.layers):
        layer = copy.deepcopy(original)
        before = layer(x, *ropes[layer.rope_kind], None)
        plan = layer_plan(loaded.config, i)
        stats = {n: torch.rand(layer.get_submodule(n).in_features) * 10 for n in plan.inputs_to_capture}
        smooth_layer(layer, plan, stats, alpha=0.5)
        assert not torch.equal(layer.input_layernorm.weight, original.input_layernorm.weight)
        torch.testing.assert_close(layer(x, *ropes[layer.rope_kind], None), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_awq_and_smoothquant_run_on_each_family(family_dir, calib_text, name):
    from miaotui.compress.quantize.apply import quantize_model

    for method, fmt in (("awq", QuantFormat(4, 32, False)), ("smoothquant", QuantFormat(8, -1, True))):
        loaded = load_model(family_dir(name), torch.float32)
        reference = _logits(loaded.model)
        calib = load_calibration(calib_text, loaded.tokenizer, 8, 32)
        quantize_model(loaded.model, method, fmt, calib)
        assert _similarity(_logits(loaded.model), reference) >= 0.9, method


@pytest.mark.parametrize("name,structure", [*((n, "channels") for n in FAMILIES), *((n, "experts") for n in MOE)])
def test_structured_pruning_each_family(family_dir, tmp_path, name, structure):
    from miaotui.compress.prune.structured import prune_structured
    from miaotui.loaders.miaotui_dir import save_model

    loaded = load_model(family_dir(name), torch.float32)
    smaller, record = prune_structured(loaded.model, structure, 0.5)
    assert record.params_after < record.params_before
    if structure == "experts":
        assert smaller.config.num_experts == loaded.config.num_experts // 2
        assert len(smaller.layers[0].mlp.experts) == smaller.config.num_experts
    out = save_model(smaller, loaded.tokenizer, tmp_path / "m", stages=[record.to_dict()])
    again = load_model(out, torch.float32)
    torch.testing.assert_close(_logits(again.model), _logits(smaller))


@pytest.mark.parametrize("name,tp,pp", [("qwen3", 2, 1), ("qwen3_moe", 2, 1), ("mixtral", 2, 1), ("gemma3", 1, 2)])
def test_parallel_logits_equal_one_process(family_dir, tmp_path, name, tp, pp):
    from tests.unit.test_distributed import parallel_and_single_logits

    got, ref = parallel_and_single_logits(family_dir(name), tmp_path / "logits.pt", tp, pp)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_distillation_on_each_family(family_dir, calib_text, tmp_path, name):
    from miaotui.compress.distill import DistillConfig, distill
    from miaotui.compress.prune.unstructured import prune_model
    from miaotui.compress.training import load_training_tokens

    teacher = load_model(family_dir(name), torch.float32)
    student = load_model(family_dir(name), torch.float32)
    prune_model(student.model, "magnitude", 0.5)
    tokens = load_training_tokens(calib_text, student.tokenizer)
    cfg = DistillConfig(steps=8, lr=3e-3, batch=2, seq_len=32, checkpoint_every=100, autocast="none")
    result = distill(teacher.model, student.model, tokens, cfg, tmp_path / "ckpt", progress=False)
    assert result.steps == 8 and result.losses[-1] < result.losses[0]
    first = student.model.get_submodule(model_linears(student.config)[-1]).weight
    assert float((first == 0).float().mean()) == pytest.approx(0.5, abs=0.02)  # the masks stay
