"""Gradual pruning schedule and training, knowledge distillation (loss, resume, masks), and their CLI."""

import json

import pytest
import torch

from miaotui.cli import main
from miaotui.compress.distill import DistillConfig, check_same_tokenizer, distill, distill_loss
from miaotui.compress.prune.gradual import GradualSchedule, train_gradual
from miaotui.compress.prune.unstructured import prune_model
from miaotui.compress.training import load_training_tokens
from miaotui.errors import MiaotuiError
from miaotui.loaders.load import load_model


def test_cubic_schedule():
    s = GradualSchedule(initial_sparsity=0.1, final_sparsity=0.7, begin_step=10, end_step=110, frequency=10)
    assert s.sparsity(0) == 0.0 and s.sparsity(9) == 0.0
    assert s.sparsity(10) == pytest.approx(0.1)
    # Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
    assert s.sparsity(60) == pytest.approx(0.7 + (0.1 - 0.7) * 0.5**3)
    assert s.sparsity(65) == s.sparsity(60)  # held between updates
    assert s.sparsity(110) == pytest.approx(0.7) and s.sparsity(500) == pytest.approx(0.7)
    curve = [s.sparsity(t) for t in range(0, 200)]
    assert curve == sorted(curve)  # never decreases
    deltas = [s.sparsity(t + 10) - s.sparsity(t) for t in range(10, 100, 10)]
    assert deltas == sorted(deltas, reverse=True)  # fast at first, then slower (cubic)
    assert [t for t in range(200) if s.is_update(t)] == list(range(10, 111, 10))


@pytest.mark.parametrize("kwargs,field", [({"initial_sparsity": 0.5, "final_sparsity": 1.0}, "final_sparsity"),
                                          ({"initial_sparsity": 0.6, "final_sparsity": 0.5}, "initial_sparsity"),
                                          ({"begin_step": 5, "end_step": 5}, "end_step"),
                                          ({"frequency": 0}, "frequency")])
def test_schedule_errors_name_the_field(kwargs, field):
    args = {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 10, "frequency": 1}
    with pytest.raises(MiaotuiError, match=field):
        GradualSchedule(**{**args, **kwargs})


def test_gradual_training_reaches_final_sparsity(tiny_hf_dir, calib_text):
    loaded = load_model(tiny_hf_dir, torch.float32)
    tokens = load_training_tokens(calib_text, loaded.tokenizer)
    schedule = GradualSchedule(0.0, 0.6, 2, 12, frequency=2)
    record = train_gradual(loaded.model, tokens, schedule, steps=16, batch=2, seq_len=32, progress=False)
    assert [step for step, _ in record.curve] == [2, 4, 6, 8, 10, 12]
    measured = [s for _, s in record.curve]
    assert measured == sorted(measured) and measured[-1] == pytest.approx(0.6, abs=0.01)
    for step, s in record.curve:
        assert s == pytest.approx(schedule.sparsity(step), abs=0.01)
    w = loaded.model.layers[1].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.05)


def test_distill_loss_is_zero_for_identical_logits_at_alpha_0():
    z = torch.randn(2, 3, 11)
    assert float(distill_loss(z, z, torch.zeros(2, 3, dtype=torch.long), 2.0, 0.0)) == pytest.approx(0, abs=1e-6)
    assert float(distill_loss(z, z + torch.randn_like(z), torch.zeros(2, 3, dtype=torch.long), 2.0, 0.0)) > 0


def test_distillation_lowers_the_loss_keeps_masks_and_resumes(tiny_hf_dir, calib_text, tmp_path):
    teacher = load_model(tiny_hf_dir, torch.float32)
    student = load_model(tiny_hf_dir, torch.float32)
    prune_model(student.model, "magnitude", 0.5)
    tokens = load_training_tokens(calib_text, student.tokenizer)
    cfg = DistillConfig(steps=12, lr=3e-3, batch=2, seq_len=32, checkpoint_every=5, autocast="none")
    result = distill(teacher.model, student.model, tokens, cfg, tmp_path / "ckpt", progress=False)
    assert result.steps == 12 and result.losses[-1] < result.losses[0]
    assert float((student.model.layers[0].mlp.gate_up_proj.weight == 0).float().mean()) == pytest.approx(0.5, 0.01)
    # An interrupted run resumes from its last checkpoint (step 10 here) and ends where a full run ends.
    again = load_model(tiny_hf_dir, torch.float32)
    prune_model(again.model, "magnitude", 0.5)
    resumed = distill(teacher.model, again.model, tokens, cfg, tmp_path / "ckpt", progress=False)
    assert resumed.resumed_from == 10 and resumed.steps == 12


def test_tokenizer_mismatch_is_rejected(tiny_hf_dir, tmp_path):
    from tests.tiny_models import write_hf_dir

    other = write_hf_dir(tmp_path / "other", vocab_size=300)
    with pytest.raises(MiaotuiError, match="tokenizers differ"):
        check_same_tokenizer(load_model(tiny_hf_dir, torch.float32).tokenizer,
                             load_model(other, torch.float32).tokenizer)


def test_cli_prune_distill_and_errors(tiny_hf_dir, calib_text, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "-m", str(tiny_hf_dir), "--structured", "channels", "--sparsity", "0.5",
                 "-o", str(pruned)]) == 0
    assert json.loads((pruned / "miaotui_model.json").read_text())["config"]["intermediate_size"] == 64
    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(tiny_hf_dir), "--student", str(pruned), "--text-file", str(calib_text),
                 "--steps", "3", "--batch", "2", "--seq-len", "32", "-o", str(out)]) == 0
    stages = json.loads((out / "miaotui_model.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["prune", "distill"]
    assert not (tmp_path / "distilled.ckpt").exists()
    assert main(["generate", "-m", str(out), "--max-tokens", "4", "--temperature", "0", "-p", "hello"]) == 0
    assert main(["prune", "-m", str(tiny_hf_dir), "--sparsity", "0.5", "--pattern", "2:4", "-o",
                 str(tmp_path / "nm")]) == 0
    assert main(["prune", "-m", str(tiny_hf_dir), "--sparsity", "0.7", "--gradual", "--end-step", "4", "--steps", "6",
                 "--frequency", "2", "--text-file", str(calib_text), "--batch", "2", "--seq-len", "32",
                 "-o", str(tmp_path / "gradual")]) == 0
    capsys.readouterr()
    for argv, message in [(["--sparsity", "1.5"], "sparsity must be in"),
                          (["--sparsity", "0.5", "--pattern", "3:7"], "does not divide"),
                          (["--structured", "layers"], "--sparsity is required"),
                          (["--sparsity", "0.5", "--method", "wanda", "--calib-file", "/nope.txt"],
                           "calibration file '/nope.txt' does not exist"),
                          (["--sparsity", "0.5", "--targets", "nope"], "targets: 'nope' matches no module")]:
        assert main(["prune", "-m", str(tiny_hf_dir), *argv, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
