"""Perplexity windows (both protocols) and the value on a tiny model against a direct computation."""

import json
import math

import pytest
import torch

from miaotui.errors import MiaotuiError
from miaotui.eval.perplexity import perplexity, window_plan


def test_non_overlapping_windows_score_all_but_first_token():
    plan = window_plan(2048, ctx=512, stride=512, score_from=0)
    assert plan == [(0, 512, 1), (512, 1024, 513), (1024, 1536, 1025), (1536, 2048, 1537)]
    assert sum(end - first for _, end, first in plan) == 4 * 511


def test_llama_cpp_protocol_scores_second_half():
    plan = window_plan(40 * 512, ctx=512, stride=512, score_from=256)
    assert len(plan) == 40 and all(end - first == 255 for _, end, first in plan)


def test_overlapping_windows_never_score_a_token_twice():
    plan = window_plan(1000, ctx=256, stride=128, score_from=0)
    targets = [t for _, end, first in plan for t in range(first, end)]
    assert targets == list(range(1, 1000))


def test_bad_windows_are_rejected():
    with pytest.raises(MiaotuiError):
        window_plan(100, ctx=64, stride=128, score_from=0)
    with pytest.raises(MiaotuiError):
        window_plan(100, ctx=64, stride=64, score_from=64)


def test_value_matches_direct_cross_entropy(tiny_llm):
    ids = torch.randint(0, tiny_llm.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(tiny_llm.model, ids, ctx=100, progress=False)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, 300, 100):
            window = torch.tensor([ids[begin:begin + 100]])
            logits = tiny_llm.model(window, torch.arange(window.shape[1])[None])[0]
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("dtype, quantize, tolerance", [
    ("float32", None, 1e-4),  # the same float32 sums, another order
    ("bfloat16", None, 0.01),  # bf16 tiles / fused decode layer against bf16 GEMMs
    ("bfloat16", ["--bits", "4", "--group-size", "32", "--symmetric"], 0.01),  # int8-quantized activations
])
def test_decode_steps_score_as_the_prefill_path(tmp_path, dtype, quantize, tolerance):
    """decode_perplexity scores the same targets through one prefill step and then single-token
    decode steps (the few-row kernels): it agrees with the one-pass perplexity."""
    from miaotui import LLM
    from miaotui.cli import main
    from miaotui.eval.perplexity import decode_perplexity
    from tests.tiny_models import write_hf_dir

    path = write_hf_dir(tmp_path / "wide", hidden_size=128, intermediate_size=256)  # 32-wide heads
    if quantize:
        assert main(["quantize", "-m", str(path), "--method", "rtn", *quantize, "-o", str(tmp_path / "q")]) == 0
        path = tmp_path / "q"
    llm = LLM(str(path), dtype=dtype)
    ids = torch.randint(0, llm.config.vocab_size, (3 * 64,), generator=torch.Generator().manual_seed(0)).tolist()
    one_pass = perplexity(llm.model, ids, ctx=64, score_from=32, progress=False)
    stepped = decode_perplexity(llm.model, ids, ctx=64, progress=False)
    assert stepped.tokens == one_pass.tokens == 3 * 31
    assert abs(stepped.ppl / one_pass.ppl - 1) < tolerance


def test_scoring_through_the_paged_cache(tmp_path, capsys):
    """perplexity(kv_cache_dtype=...): each window one prefill step through a paged cache. "auto"
    scores as the plain pass; int8 and fp8 codes move it a little (random weights: a flat
    distribution, so only slightly); decode steps over the int8 cache agree with its prefill."""
    from miaotui import LLM
    from miaotui.cli import main
    from miaotui.eval.perplexity import decode_perplexity
    from tests.tiny_models import write_hf_dir

    path = write_hf_dir(tmp_path / "wide", hidden_size=128, intermediate_size=256)
    llm = LLM(str(path), dtype="bfloat16")
    ids = torch.randint(0, llm.config.vocab_size, (3 * 64,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = perplexity(llm.model, ids, ctx=64, score_from=32, progress=False).ppl
    cached = {d: perplexity(llm.model, ids, ctx=64, score_from=32, progress=False, kv_cache_dtype=d).ppl
              for d in ("auto", "int8", "fp8")}
    assert cached["auto"] == pytest.approx(plain, rel=1e-3)
    assert cached["int8"] != cached["auto"] and cached["int8"] == pytest.approx(plain, rel=0.01)
    assert cached["fp8"] == pytest.approx(plain, rel=0.03)
    stepped = decode_perplexity(llm.model, ids, ctx=64, progress=False, kv_cache_dtype="int8").ppl
    assert stepped == pytest.approx(cached["int8"], rel=0.01)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", "ppl", "-m", str(path), "--text-file", str(text), "--ctx", "64", "--kv-cache-dtype", "int8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "ppl", "-m", str(path), "--kv-cache-dtype", "int4"])
    assert exit_info.value.code == 2
