"""Speculative decoding in the engine is lossless: greedy outputs equal the target's (batched, any
draft), sampled tokens follow the target's distribution; n-gram and model drafts; adaptive k."""

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.engine.speculative import NgramProposer, target_probs

PROMPTS = ["The quick brown fox", "hello hello hello hello", "a b c a b c a b"]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    from tests.tiny_models import write_hf_dir

    return write_hf_dir(tmp_path_factory.mktemp("draft"), seed=1)  # same tokenizer, other weights


def greedy(llm, max_tokens=20):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def compressed_draft(tiny_hf_dir, tmp_path_factory):
    """The target's own compressed variant: half its MLP channels, then 8-bit weights."""
    from miaotui.cli import main

    out = tmp_path_factory.mktemp("compressed")
    assert main(["prune", "-m", str(tiny_hf_dir), "--structured", "channels", "--sparsity", "0.5",
                 "-o", str(out / "p")]) == 0
    assert main(["quantize", "-m", str(out / "p"), "--method", "rtn", "--bits", "8", "--group-size", "-1",
                 "--symmetric", "-o", str(out / "q")]) == 0
    return out / "q"


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("kind", ["ngram", "model", "compressed", "self"])
def test_greedy_speculation_equals_the_target(tiny_hf_dir, tiny_llm, draft_dir, compressed_draft, k, kind):
    draft = {"ngram": None, "model": str(draft_dir), "compressed": str(compressed_draft),
             "self": str(tiny_hf_dir)}[kind]
    spec = LLM(str(tiny_hf_dir), dtype="float32", speculative_model=draft,
               speculate="ngram" if kind == "ngram" else None, num_speculative_tokens=k)
    assert greedy(spec) == greedy(tiny_llm)
    stats = spec.speculation_stats
    assert stats.steps > 0 and stats.mean_accepted_per_step >= 1.0
    if kind == "self":  # the target drafting for itself: every draft is accepted
        assert stats.acceptance_rate == 1.0


def test_ngram_lookup():
    draft = NgramProposer(max_n=3)
    assert draft.propose_one([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert draft.propose_one([5, 6, 7], 2) == []


def test_draft_model_speculation_with_preemption_keeps_greedy_outputs(tiny_hf_dir, tiny_llm, draft_dir):
    """A KV cache too small for every request at once: preempted requests are recomputed, the
    draft's cache with them, and the tokens stay the target's."""
    spec = LLM(str(tiny_hf_dir), dtype="float32", speculative_model=str(draft_dir), num_speculative_tokens=3,
               kv_cache_mb=0.03, block_size=4)
    assert spec.engine.blocks.num_blocks < 3 * 7  # fewer than the 3 prompts x ~27 tokens need
    assert greedy(spec) == greedy(tiny_llm)
    assert spec.engine.stats.preemptions > 0 and spec.speculation_stats.steps > 0


def test_sampled_speculation_is_reproducible_with_a_seed(tiny_hf_dir, draft_dir):
    spec = LLM(str(tiny_hf_dir), dtype="float32", speculative_model=str(draft_dir), num_speculative_tokens=3)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=16, ignore_eos=True)
    first = spec.generate(PROMPTS, params)
    again = spec.generate(PROMPTS[::-1], params)[::-1]  # another batch order: the same draws per request
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_sampled_distribution_matches_the_target(tiny_hf_dir, tiny_llm, draft_dir, kind):
    """The 2nd sampled token (the first one a draft proposes) follows the target's exact marginal,
    with a draft model's q and with prompt lookup's one-hot q."""
    params = SamplingParams(temperature=1.0, top_k=8, max_tokens=2, ignore_eos=True)
    prompt = tiny_llm.tokenizer.encode("The quick brown fox" if kind == "model" else "a b a b a b a b a")
    model = tiny_llm.model
    with torch.inference_mode():
        p1 = target_probs(model(torch.tensor([prompt]), torch.arange(len(prompt))[None], last_only=True)[0], params)
        firsts = torch.nonzero(p1).flatten()
        batch = torch.tensor([prompt + [int(t)] for t in firsts])
        logits = model(batch, torch.arange(len(prompt) + 1)[None].expand(len(firsts), -1), last_only=True)
        exact = sum(p1[t] * target_probs(logits[i], params) for i, t in enumerate(firsts))
    options = {"speculative_model": str(draft_dir)} if kind == "model" else {"speculate": "ngram"}
    spec = LLM(str(tiny_hf_dir), dtype="float32", num_speculative_tokens=3, **options)
    n = 3000
    counts = torch.zeros_like(exact)
    outs = spec.generate([prompt], SamplingParams(temperature=1.0, top_k=8, max_tokens=2, ignore_eos=True, n=n,
                                                  seed=1234))
    for o in outs[0].outputs:
        counts[o.token_ids[1]] += 1
    empirical = counts / n
    tv = 0.5 * float((empirical - exact).abs().sum())
    assert tv < 0.06, tv
    assert spec.speculation_stats.drafted > 0 and 0 < spec.speculation_stats.acceptance_rate < 1


def test_cli_speculation(tiny_hf_dir, capsys):
    import json

    from miaotui.cli import main

    base = ["generate", "-m", str(tiny_hf_dir), "--dtype", "float32", "--max-tokens", "12", "--ignore-eos", "--json",
            "-p", "hello hello hello"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--speculate", "ngram", "--num-speculative-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == plain
    assert main([*base, "--draft", str(tiny_hf_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == plain
