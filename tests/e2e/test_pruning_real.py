"""Pruning the real model: activation-aware criteria beat magnitude; structured pruning shrinks it."""

import pytest

from miaotui import LLM, SamplingParams
from miaotui.compress.calibration import load_calibration
from miaotui.compress.prune.structured import prune_structured
from miaotui.compress.prune.unstructured import prune_model
from miaotui.eval.perplexity import perplexity

pytestmark = pytest.mark.e2e
EVAL = 4 * 512


@pytest.fixture(scope="module")
def eval_ids(real_llm, wikitext):
    return real_llm.tokenizer.encode(wikitext.read_text(encoding="utf-8"), add_special_tokens=False)[:EVAL]


def _pruned_ppl(path, wikitext, eval_ids, method, pattern=None):
    llm = LLM(str(path), dtype="float32", decode_weight_dtype="none")
    calib = None if method == "magnitude" else load_calibration(wikitext, llm.tokenizer, 4, 512, skip_tokens=20480)
    prune_model(llm.model, method, 0.5, pattern, calib)
    return perplexity(llm.model, eval_ids, progress=False).ppl


def test_wanda_beats_magnitude_at_50_percent(real_model_path, wikitext, eval_ids):
    assert _pruned_ppl(real_model_path, wikitext, eval_ids, "wanda") < \
        0.5 * _pruned_ppl(real_model_path, wikitext, eval_ids, "magnitude")


def test_structured_channels_make_a_smaller_model_that_still_runs(real_model_path, tmp_path):
    from miaotui.loaders.miaotui_dir import save_model

    llm = LLM(str(real_model_path), dtype="float32", decode_weight_dtype="none")
    smaller, record = prune_structured(llm.model, "channels", 0.5, "magnitude")
    assert record.params_after < 0.75 * record.params_before  # >= 25% fewer parameters
    assert smaller.config.intermediate_size == 768
    out_dir = save_model(smaller, llm.tokenizer, tmp_path / "narrow")
    again = LLM(str(out_dir))  # default dtypes, as a user loads it
    assert again.model.num_parameters() == record.params_after
    out = again.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert len(out.token_ids) == 8
