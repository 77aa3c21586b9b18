"""Every family against transformers itself: tiny random checkpoints with each family's features
switched on (sliding windows shorter than the sequences, 8 experts top-2, soft-caps, q/k norms,
YaRN, LongRoPE, partial rotation), logits through LLM and through the serving engine's paged
steps, and greedy generation."""

from __future__ import annotations

import pytest
import torch

from miaotui.engine.paged_cache import PagedKVCache
from miaotui.engine.step import PackRow, pack_rows, run_model_step
from miaotui.errors import MiaotuiError
from tests.tiny_models import FAMILY_CONFIGS, WINDOW, write_hf_dir

FAMILIES = sorted(FAMILY_CONFIGS)
LENGTHS = (3, 11, 2 * WINDOW + 5)  # a mixed-length batch, the longest past the window twice
ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, family_dir):
    """(name, checkpoint directory, transformers' model, miaotui's LLM) for one family."""
    import transformers

    from miaotui import LLM

    directory = family_dir(request.param)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return request.param, directory, reference, LLM(str(directory), dtype="float32", block_size=4)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in LENGTHS]


def _reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()  # [S, V]


def test_logits_equal_transformers(family):
    _, _, reference, llm = family
    for ids in _prompts():
        with torch.inference_mode():
            ours = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        torch.testing.assert_close(ours, _reference_logits(reference, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_engine_steps_equal_transformers(family, dtype):
    """The rows prefilled together in chunks of 5 through the paged cache (several attention groups,
    cached keys read back, windows applied across chunk boundaries): every position's logits. In
    bfloat16 the native kernels run (paged attention, fused decode layers where a layer fits them),
    within bf16's rounding of transformers' float32 logits."""
    from miaotui import LLM

    _, directory, reference, llm = family
    if dtype == "bfloat16":
        llm = LLM(str(directory), dtype="bfloat16", block_size=4)
    prompts, block = _prompts(), 4
    cache = PagedKVCache(llm.model.config, 64, block, llm.model.dtype, torch.device("cpu"))
    tables = [list(range(1 + 16 * r, 17 + 16 * r)) for r in range(len(prompts))]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        live = [r for r, p in enumerate(prompts) if done[r] < len(p)]
        rows = [PackRow(prompts[r][done[r]:done[r] + 5], done[r], tables[r], all_logits=True) for r in live]
        step, _, slices = pack_rows(rows, block)
        with torch.inference_mode():
            logits, _ = run_model_step(llm.model, cache, step)
        for r, row, part in zip(live, rows, slices, strict=True):
            got[r].append(logits[part])
            done[r] += len(row.tokens)
    for ids, parts in zip(prompts, got, strict=True):
        torch.testing.assert_close(torch.cat(parts), _reference_logits(reference, ids),
                                   atol=ATOL if dtype == "float32" else 0.05, rtol=0)


def test_greedy_generation_equals_transformers(family):
    from miaotui import SamplingParams

    _, _, reference, llm = family
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        expected = list(ids)  # transformers' greedy choice at each step, end-of-text tokens included
        for _ in range(32):
            expected.append(int(_reference_logits(reference, expected)[-1].argmax()))
        assert out.outputs[0].token_ids == expected[len(ids):]


def test_an_unsupported_architecture_names_itself_and_the_supported(tmp_path):
    import json

    from miaotui.loaders.load import load_model

    directory = write_hf_dir(tmp_path / "m", arch="llama")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MiaotuiError) as err:
        load_model(directory, torch.float32)
    message = str(err.value)
    assert "'FalconForCausalLM'" in message and "Gemma3ForCausalLM" in message and "\n" not in message


def test_a_sliding_window_model_holds_a_bounded_cache(family_dir):
    """Every layer of the Mistral checkpoint slides (window 8): blocks behind the window are given
    back as a long generation goes on, so the blocks held stop growing; the tokens stay those of a
    cache-free forward."""
    from miaotui import LLM, SamplingParams

    llm = LLM(str(family_dir("mistral_window")), dtype="float32", block_size=4)
    prompt = _prompts()[1]
    held = []
    tokens = []
    for event in llm.stream([prompt], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)):
        tokens.append(event.token_id)
        held.append(sum(1 for b in llm.engine.running[0].table if b != 0) if llm.engine.running else 0)
    assert len(tokens) == 64
    assert max(held) <= -(-WINDOW // 4) + 2  # the window's blocks, a partial one and the one being filled
    assert max(held[10:]) == max(held[-10:])  # flat once past the window
    expected = list(prompt)
    with torch.inference_mode():
        for _ in range(64):
            expected.append(int(llm.model(torch.tensor([expected]), torch.arange(len(expected))[None])[0, -1]
                                .argmax()))
    assert tokens == expected[len(prompt):]
    assert llm.engine.blocks.usage == 0.0  # everything given back at the end


def test_blocks_behind_the_window_are_given_back_and_skipped():
    from miaotui.engine.block_manager import BlockManager

    blocks = BlockManager(8, 4)
    table: list[int] = []
    blocks.grow(table, 13)  # 4 blocks
    tokens = list(range(13))
    blocks.commit_full_blocks(table, tokens, 12)
    first = table[0]
    assert blocks.drop_before(table, 9) == 2 and table[:2] == [0, 0]  # positions 0-7 are behind
    assert blocks.drop_before(table, 9) == 0
    blocks.commit_full_blocks(table, tokens, 12)  # entries given back are not hashed again
    assert 0 not in blocks.block_hash
    assert blocks.match_prefix(tokens[:5]) == [first]  # a given-back hashed block is still findable
    blocks.release(table)
    assert table == []


@pytest.mark.parametrize("name", ["mixtral", "gemma2", "phi3"])
def test_prompt_lookup_speculation_keeps_greedy_tokens(family_dir, name):
    from miaotui import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [p * 2 for p in _prompts()]  # repeated text: prompt lookup finds drafts
    plain = LLM(str(family_dir(name)), dtype="float32", block_size=4).generate(prompts, greedy)
    spec = LLM(str(family_dir(name)), dtype="float32", block_size=4, speculate="ngram")
    drafted = spec.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    assert spec.engine.stats.spec_drafted > 0


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe"])
def test_openai_server_on_a_family(family_dir, name):
    import openai

    from miaotui import LLM, SamplingParams
    from tests.unit.server_process import running_server

    messages = [{"role": "user", "content": "Hello there"}]
    local = LLM(str(family_dir(name)), dtype="float32").chat(
        messages, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    with running_server(family_dir(name), "--served-model-name", name, "--dtype", "float32") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0.0,
                                               extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == local
    assert reply.usage.completion_tokens == 12


def test_a_multimodal_gemma3_checkpoint_runs_its_language_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration (a vision tower beside the text
    model, under language_model.*): miaotui runs the text model, with transformers' logits."""
    import json

    import transformers

    from miaotui import LLM
    from tests.tiny_models import train_tokenizer

    text = FAMILY_CONFIGS["gemma3"][2] | dict(vocab_size=420, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=5, boi_token_index=6, eoi_token_index=7)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    train_tokenizer(420).save(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    ours = LLM(str(tmp_path), dtype="float32")
    assert ours.model.config.architecture == "gemma3" and ours.model.config.num_layers == 6
    ids = _prompts()[2]
    with torch.inference_mode():
        got = ours.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_prefix_caching_with_sliding_windows(family_dir):
    """A second request with the same long prompt reuses its blocks (those given back behind the
    window stay findable until the pool needs them) and generates the same tokens."""
    from miaotui import LLM, SamplingParams

    llm = LLM(str(family_dir("mistral_window")), dtype="float32", block_size=4)
    prompt = _prompts()[2] + _prompts()[1]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    hits = llm.engine.blocks.prefix_hits
    second = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    assert llm.engine.blocks.prefix_hits - hits >= len(prompt) // 4 - 1
    assert second == first
