"""The serving engine: continuous batching over a paged KV cache, prefix caching, preemption,
aborts, logprobs; greedy outputs must equal single-request generation."""

import random

import pytest
import torch

from miaotui import SamplingParams
from miaotui.engine.block_manager import BlockManager, block_hashes
from miaotui.engine.config import EngineConfig
from miaotui.engine.llm_engine import LLMEngine
from miaotui.engine.paged_cache import kv_bytes_per_token
from miaotui.engine.request import EngineRequest
from miaotui.errors import MiaotuiError


def make_engine(llm, max_model_len: int, **options) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(**options), max_model_len)


def run_all(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]], stagger: int = 0,
            **kwargs) -> dict[str, dict]:
    """Add requests (one every `stagger` steps, or all at once) and step until all finish."""
    results: dict[str, dict] = {}

    def sink_for(rid):
        def sink(out):
            r = results.setdefault(rid, {"ids": [], "text": "", "finish": None, "out": []})
            r["ids"] += out.token_ids
            r["text"] += out.text
            r["out"].append(out)
            if out.finished:
                r["finish"] = out.finish_reason
        return sink

    pending = list(requests)
    steps = 0
    while pending or engine.num_unfinished:
        if pending and (stagger == 0 or steps % stagger == 0):
            for rid, ids, params in pending[: None if stagger == 0 else 1]:
                engine.add_request(EngineRequest(rid, ids, params, sink_for(rid), **kwargs))
            pending = [] if stagger == 0 else pending[1:]
        engine.step()
        steps += 1
        assert steps < 5000
    return results


def reference(llm, ids, max_tokens):
    return llm.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0] \
        .outputs[0].token_ids


def test_block_hashes_chain():
    assert block_hashes([1, 2, 3, 4, 5], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]  # depends on the prefix
    assert block_hashes([1, 2, 3], 2) == block_hashes([1, 2, 4], 2)[:1]


def test_block_manager_refcounts_prefix_reuse_and_eviction():
    bm = BlockManager(num_blocks=5, block_size=2)
    a: list[int] = []
    bm.grow(a, 5)  # 3 blocks
    bm.commit_full_blocks(a, [1, 2, 3, 4, 5], 5)
    b = bm.match_prefix([1, 2, 3, 4, 9])
    assert b == a[:2] and bm.ref_count[a[0]] == 2
    bm.release(a)
    assert bm.num_free == 2  # a's third block is free; the two shared ones are still held by b
    bm.release(b)
    assert bm.num_free == 4 and bm.usage == 0.0
    c: list[int] = []
    bm.grow(c, 8)  # needs all 4: evicts the cached blocks
    assert bm.match_prefix([1, 2, 3, 4, 9]) == [] and not bm.can_grow(c, 9)
    with pytest.raises(MiaotuiError, match="out of blocks"):
        bm.grow(c, 9)


@pytest.mark.parametrize("budget,stagger", [(512, 0), (7, 0), (32, 3)])
def test_greedy_outputs_equal_single_request_generation(tiny_llm, budget, stagger):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randrange(1, 40))] for _ in range(9)]
    engine = make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=4,
                       max_num_seqs=5, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)], stagger)
    for i, p in enumerate(prompts):
        assert results[f"r{i}"]["ids"] == reference(tiny_llm, p, 12), i
        assert results[f"r{i}"]["finish"] == "length"
    assert engine.blocks.usage == 0.0


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny_llm):
    shared = list(range(10, 70))
    engine = make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = run_all(engine, [("a", shared + [5, 6], params)])
    assert engine.blocks.prefix_hits == 0
    second = run_all(engine, [("b", shared + [7], params)])
    assert engine.blocks.prefix_hits == 56  # 7 full blocks of the shared 60 tokens
    assert first["a"]["ids"] == reference(tiny_llm, shared + [5, 6], 6)
    assert second["b"]["ids"] == reference(tiny_llm, shared + [7], 6)


def test_preemption_by_recomputation_keeps_outputs(tiny_llm):
    prompts = [list(range(20 + i, 50 + i)) for i in range(4)]
    # 24 usable blocks of 4 tokens: four requests of 30 + 40 tokens cannot all stay resident.
    mb = 25 * 4 * kv_bytes_per_token(tiny_llm.model.config, torch.float32) / 2**20
    engine = make_engine(tiny_llm, 256, kv_cache_mb=mb, block_size=4)
    assert engine.blocks.num_blocks == 25
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert engine.stats.preemptions > 0
    for i, p in enumerate(prompts):
        assert results[f"r{i}"]["ids"] == reference(tiny_llm, p, 40)
    assert engine.blocks.usage == 0.0


def test_abort_frees_blocks_and_others_finish(tiny_llm):
    engine = make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    results: dict[str, list] = {}
    for i in range(6):
        engine.add_request(EngineRequest(f"r{i}", list(range(5, 25)), params,
                                         lambda out, i=i: results.setdefault(f"r{i}", []).append(out)))
    for _ in range(5):
        engine.step()
    for i in (1, 3):
        engine.abort(f"r{i}")
    while engine.num_unfinished:
        engine.step()
    reasons = {rid: outs[-1].finish_reason for rid, outs in results.items()}
    assert reasons == {"r0": "length", "r1": "abort", "r2": "length", "r3": "abort", "r4": "length",
                       "r5": "length"}
    assert engine.blocks.usage == 0.0


def test_stop_strings_seeds_logprobs_and_errors(tiny_llm):
    engine = make_engine(tiny_llm, 64, kv_cache_mb=4, block_size=4)
    ids = tiny_llm.tokenizer.encode("The quick brown fox")
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = run_all(engine, [("a", ids, sampled)])["a"]["ids"]
    b = run_all(engine, [("b", ids, sampled), ("c", ids[:2], sampled)])["b"]["ids"]
    assert a == b  # seeded sampling does not depend on the batch
    out = run_all(engine, [("d", ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))], logprobs=2,
                  prompt_logprobs=1)["d"]["out"]
    assert out[0].prompt_logprobs[0] is None and len(out[0].prompt_logprobs) == len(ids)
    assert all(lp.logprob <= 0 and len(lp.top) == 1 for lp in out[0].prompt_logprobs[1:])
    assert all(len(o.logprobs) == 1 and len(o.logprobs[0].top) == 2 for o in out)
    with pytest.raises(MiaotuiError, match="maximum context length is 64"):
        engine.add_request(EngineRequest("e", ids, SamplingParams(max_tokens=100), lambda o: None))


@pytest.mark.parametrize("k,kv_mb,stagger,kv_dtype", [(2, 4, 0, "auto"), (4, 4, 2, "auto"), (8, 0.05, 0, "auto"),
                                                      (4, 4, 2, "int8"), (8, 0.03, 0, "fp8")])
def test_prompt_lookup_speculation_keeps_greedy_outputs(tiny_llm, k, kv_mb, stagger, kv_dtype):
    """Drafted tokens verified in the batch: the same tokens as plain decoding, fewer steps.
    kv_mb=0.05 leaves too few blocks for every request (drafts are dropped or requests preempted).
    Over a quantized cache the same holds against plain decoding over that cache."""
    rng = random.Random(k)
    motif = [rng.randrange(3, 400) for _ in range(6)]
    prompts = [motif * 4 + [rng.randrange(3, 400) for _ in range(i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    runs = {}
    for spec in (0, k):
        engine = make_engine(tiny_llm, 256, kv_cache_mb=kv_mb, block_size=4, kv_cache_dtype=kv_dtype,
                             max_num_seqs=4, max_num_batched_tokens=64, speculate="ngram" if spec else None,
                             num_speculative_tokens=max(spec, 1))
        runs[spec] = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)], stagger)
        assert engine.blocks.usage == 0.0
        if spec:
            assert engine.stats.spec_accepted > 0 and engine.stats.spec_drafted >= engine.stats.spec_accepted
    for i, p in enumerate(prompts):
        assert runs[k][f"r{i}"]["ids"] == runs[0][f"r{i}"]["ids"], i
        assert kv_dtype != "auto" or runs[0][f"r{i}"]["ids"] == reference(tiny_llm, p, 30), i
        assert runs[k][f"r{i}"]["finish"] == "length"


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_a_quantized_kv_cache_holds_twice_the_tokens(tiny_hf_dir, kv_dtype):
    """One-byte codes and a float16 scale per token and kv head: 2 hd / (hd + 2) times the bf16
    cache's tokens in the same --kv-cache-mb (hd = 16 here: 1.78x; 64: 1.94x; 128: 1.97x), and the
    pools hold no more than that memory."""
    from miaotui import LLM

    tokens = {}
    for dtype in ("auto", kv_dtype):
        llm = LLM(str(tiny_hf_dir), dtype="bfloat16", kv_cache_mb=2, kv_cache_dtype=dtype, block_size=4)
        engine = llm.engine
        tokens[dtype] = engine.capacity_tokens
        assert engine.cache.bytes <= 2 * 2**20
        hd = llm.config.head_dim
    assert engine.cache.keys[0].element_size() == 1 and engine.cache.key_scales[0].dtype == torch.float16
    assert tokens[kv_dtype] / tokens["auto"] == pytest.approx(2 * hd / (hd + 2), rel=0.01)
    assert kv_bytes_per_token(llm.config, torch.bfloat16, kv_dtype) * 2 * hd == \
        kv_bytes_per_token(llm.config, torch.bfloat16) * (hd + 2)


def test_a_quantized_kv_cache_keeps_prefix_caching_and_preemption(tiny_llm):
    """Prefix blocks hold codes and scales as any block: a request reusing them gives the tokens a
    fresh cache gives it; preemption recomputes into codes again."""
    shared = list(range(10, 70))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    requests = [("a", shared + [5, 6], params), ("b", shared + [7], params)]
    fresh = {rid: run_all(make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=8, kv_cache_dtype="int8",
                                      enable_prefix_caching=False), [(rid, ids, p)])[rid]["ids"]
             for rid, ids, p in requests}
    engine = make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=8, kv_cache_dtype="int8")
    for request in requests:
        assert run_all(engine, [request])[request[0]]["ids"] == fresh[request[0]]
    assert engine.blocks.prefix_hits == 56
    tight = make_engine(tiny_llm, 256, block_size=4, kv_cache_dtype="int8", kv_cache_mb=25 * 4 * kv_bytes_per_token(
        tiny_llm.model.config, torch.float32, "int8") / 2**20)
    prompts = [list(range(20 + i, 50 + i)) for i in range(4)]
    results = run_all(tight, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert tight.stats.preemptions > 0
    for i, p in enumerate(prompts):
        alone = run_all(make_engine(tiny_llm, 256, kv_cache_mb=4, block_size=4, kv_cache_dtype="int8"),
                        [("x", p, params)])["x"]["ids"]
        assert results[f"r{i}"]["ids"] == alone, i


def test_unknown_kv_cache_dtype_is_a_clear_error(tiny_llm):
    with pytest.raises(MiaotuiError, match="unknown KV-cache dtype 'int4'"):
        make_engine(tiny_llm, 256, kv_cache_dtype="int4")
