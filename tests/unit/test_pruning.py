"""Pruning: criteria, masks, SparseGPT, unstructured/N:M/structured pruning, sparse checkpoints, errors."""

import json

import pytest
import torch

from miaotui.compress.calibration import load_calibration
from miaotui.compress.prune.importance import magnitude_importance, taylor_score, wanda_score
from miaotui.compress.prune.masks import nm_mask, owl_sparsities, unstructured_mask
from miaotui.compress.prune.sparsegpt import sparsegpt_prune_weight
from miaotui.compress.prune.structured import prune_structured
from miaotui.compress.prune.unstructured import prune_model
from miaotui.errors import MiaotuiError
from miaotui.loaders.load import load_model
from miaotui.loaders.miaotui_dir import pack_sparse, save_model, unpack_sparse


def test_criteria():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert torch.allclose(magnitude_importance(w).sum(), torch.tensor(1.0))
    assert torch.equal(taylor_score(w, torch.tensor([[2.0, 0.0], [-1.0, 1.0]])), torch.tensor([[2.0, 0.0],
                                                                                                [0.5, 4.0]]))
    # A small weight on a loud input outranks a big weight on a quiet one.
    s = wanda_score(torch.tensor([[0.1, 1.0]]), torch.tensor([10_000.0, 1.0]))
    assert s[0, 0] > s[0, 1]


def test_masks():
    score = torch.rand(8, 16)
    m = unstructured_mask(score, 0.5)
    assert int(m.sum()) == 64 and torch.equal(m.sum(1), torch.full((8,), 8))
    m = nm_mask(score, 2, 4)
    assert torch.equal(m.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2))
    with pytest.raises(MiaotuiError, match="does not divide"):
        nm_mask(torch.rand(4, 10), 2, 4)
    s = owl_sparsities([0.01, 0.05, 0.02], 0.5)
    assert abs(sum(s) / 3 - 0.5) < 1e-9 and s[1] == min(s)  # most outliers -> least pruned
    with pytest.raises(MiaotuiError, match=r"sparsity must be in \[0, 1\)"):
        unstructured_mask(score, 1.0)


def test_sparsegpt_reconstruction_beats_plain_masking():
    torch.manual_seed(0)
    # Strongly correlated inputs (low rank + noise), as LLM activations are: where reconstruction pays.
    x = torch.randn(2048, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(2048, 64)
    w = torch.randn(32, 64)
    h = 2 * x.t() @ x / x.shape[0]
    for nm in (None, (2, 4)):
        pruned = sparsegpt_prune_weight(w, h, 0.5, nm)
        assert abs(float((pruned == 0).float().mean()) - 0.5) < 0.02
        if nm:
            assert torch.equal((pruned != 0).reshape(32, 16, 4).sum(-1), torch.full((32, 16), 2))
        mag = w * (unstructured_mask(w.abs(), 0.5) if nm is None else nm_mask(w.abs(), *nm))
        assert (x @ (w - pruned).t()).norm() < 0.7 * (x @ (w - mag).t()).norm()


@pytest.mark.parametrize("method,pattern", [("magnitude", None), ("wanda", None), ("sparsegpt", "2:4"),
                                            ("taylor", None), ("wanda", "4:8")])
def test_prune_model_and_sparse_checkpoint(tiny_hf_dir, tmp_path, calib_text, method, pattern):
    loaded = load_model(tiny_hf_dir, torch.float32)
    calib = load_calibration(calib_text, loaded.tokenizer, 4, 32)
    record = prune_model(loaded.model, method, 0.5, pattern, calib, targets=[r"mlp\."], ignore=[r"layers\.0\.mlp.down"])
    assert set(record.modules) == {"layers.0.mlp.gate_up_proj", "layers.1.mlp.gate_up_proj", "layers.1.mlp.down_proj"}
    assert all(abs(s - 0.5) < 0.01 for s in record.modules.values())
    assert float((loaded.model.layers[0].mlp.down_proj.weight == 0).float().mean()) < 0.01  # ignored
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    before = loaded.model(ids, torch.arange(5)[None])
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "p", stages=[{"stage": "prune", **record.to_dict()}])
    meta = json.loads((out / "miaotui_model.json").read_text())
    assert len(meta["sparse_tensors"]) == 3 and meta["stages"][0]["method"] == method
    again = load_model(out, torch.float32)
    torch.testing.assert_close(again.model(ids, torch.arange(5)[None]), before)


def test_sparse_packing_round_trip():
    t = torch.randn(7, 9) * (torch.rand(7, 9) > 0.6)
    mask, values = pack_sparse(t)
    assert mask.numel() == 8 and values.numel() == int((t != 0).sum())
    assert torch.equal(unpack_sparse(mask, values, (7, 9)), t)


@pytest.mark.parametrize("structure,criterion", [("channels", "magnitude"), ("heads", "taylor"),
                                                 ("layers", "wanda")])
def test_structured_pruning_makes_a_smaller_model_that_saves_and_loads(tiny_hf_dir, tmp_path, calib_text,
                                                                       structure, criterion):
    loaded = load_model(tiny_hf_dir, torch.float32)
    calib = load_calibration(calib_text, loaded.tokenizer, 4, 32)
    smaller, record = prune_structured(loaded.model, structure, 0.5, criterion, calib)
    assert record.params_after < record.params_before
    c = smaller.config
    assert {"channels": c.intermediate_size == 64, "heads": c.num_heads == 2 and c.num_kv_heads == 2,
            "layers": c.num_layers == 1}[structure]
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    logits = smaller(ids, torch.arange(5)[None])
    assert torch.isfinite(logits).all()
    out = save_model(smaller, loaded.tokenizer, tmp_path / "s")
    again = load_model(out, torch.float32)
    assert again.model.num_parameters() == record.params_after
    torch.testing.assert_close(again.model(ids, torch.arange(5)[None]), logits)


def test_structured_channel_pruning_with_nothing_removed_is_exact(tiny_hf_dir):
    loaded = load_model(tiny_hf_dir, torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    smaller, _ = prune_structured(loaded.model, "channels", 0.0, "magnitude")
    torch.testing.assert_close(smaller(ids, torch.arange(5)[None]), loaded.model(ids, torch.arange(5)[None]))


def test_pruning_errors(tiny_hf_dir, calib_text):
    loaded = load_model(tiny_hf_dir, torch.float32)
    with pytest.raises(MiaotuiError, match="sparsity must be in"):
        prune_model(loaded.model, "magnitude", 1.2)
    with pytest.raises(MiaotuiError, match="needs calibration"):
        prune_model(loaded.model, "wanda", 0.5)
    with pytest.raises(MiaotuiError, match="does not divide"):
        prune_model(loaded.model, "magnitude", 0.5, "2:3")
    with pytest.raises(MiaotuiError, match="targets: 'attn_typo' matches no module"):
        prune_model(loaded.model, "magnitude", 0.5, targets=["attn_typo"])
    with pytest.raises(MiaotuiError, match="unknown pruning method"):
        prune_model(loaded.model, "random", 0.5)
