"""Generation mechanics on a tiny model: KV cache, batching, sampling, stop conditions, streaming."""

import pytest
import torch

from miaotui import SamplingParams
from miaotui.errors import MiaotuiError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["Hello", "The quick brown fox jumps over", "你好，世界！模型推理", "def main():\n    print("]


def full_forward_greedy(model, ids: list[int], n: int) -> list[int]:
    """The reference with no cache at all: the whole sequence through the model for every token."""
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([out]), torch.arange(len(out))[None], last_only=True)[0]
            out.append(int(logits.argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("chunk", [512, 3])
def test_engine_decoding_equals_full_forward_without_cache(tiny_hf_dir, tiny_llm, chunk):
    """Paged KV cache, chunked prefill (chunk=3: prompts cross chunk and block boundaries) and
    continuous batching give the tokens a cache-free forward gives."""
    from miaotui import LLM

    llm = tiny_llm if chunk == 512 else LLM(str(tiny_hf_dir), dtype="float32", max_num_batched_tokens=chunk,
                                            block_size=4)
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == full_forward_greedy(tiny_llm.model, ids, 10)


def test_batch_of_different_lengths_equals_one_by_one(tiny_llm):
    batched = tiny_llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        single = tiny_llm.generate(prompt, GREEDY)[0]
        assert out.outputs[0].token_ids == single.outputs[0].token_ids
        assert out.outputs[0].text == single.outputs[0].text
        assert len(out.outputs[0].token_ids) == 24 and out.outputs[0].finish_reason == "length"


def test_batched_first_token_matches_single_forward(tiny_llm):
    model = tiny_llm.model
    short, long = [5, 17, 42], [9, 8, 7, 6, 5, 4]
    with torch.inference_mode():
        alone = model(torch.tensor([short]), torch.arange(3)[None], last_only=True)[0]
    events = list(tiny_llm.stream([short, long], SamplingParams(temperature=0.0, max_tokens=1)))
    assert [e.token_id for e in events if e.request_index == 0] == [int(alone.argmax())]


def test_a_stream_closed_early_frees_its_requests(tiny_llm):
    stream = tiny_llm.stream(["Hello", "Other prompt"], SamplingParams(temperature=0.0, max_tokens=20,
                                                                      ignore_eos=True))
    next(stream)
    stream.close()
    assert tiny_llm.engine.num_unfinished == 0 and tiny_llm.engine.blocks.usage == 0.0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    a = tiny_llm.generate("Hello", params)[0].outputs[0].token_ids
    b = tiny_llm.generate("Hello", params)[0].outputs[0].token_ids
    in_batch = tiny_llm.generate(["Hello", "Other prompt here"], params)[0].outputs[0].token_ids
    other_seed = tiny_llm.generate("Hello", SamplingParams(temperature=1.0, seed=99, max_tokens=20,
                                                           ignore_eos=True))[0].outputs[0].token_ids
    assert a == b == in_batch
    assert a != other_seed


def test_n_samples_differ_but_are_reproducible(tiny_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = [o.token_ids for o in tiny_llm.generate("Hello", params)[0].outputs]
    again = [o.token_ids for o in tiny_llm.generate("Hello", params)[0].outputs]
    assert first == again and len({tuple(t) for t in first}) == 3


def test_stop_string_truncates_and_finishes(tiny_llm):
    free = tiny_llm.generate("Hello", GREEDY)[0].outputs[0].text
    assert len(free) > 6
    stop = free[3:6]
    out = tiny_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == free[:free.index(stop)]


def test_eos_token_stops(tiny_llm):
    free = tiny_llm.generate("Hello", GREEDY)[0].outputs[0]
    stop_id = free.token_ids[5]
    out = tiny_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=24,
                                                    stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]


def test_streaming_text_equals_generate_text(tiny_llm):
    prompt = "你好，世界！模型推理"
    full = tiny_llm.generate(prompt, GREEDY)[0].outputs[0].text
    deltas = [e.text for e in tiny_llm.stream(prompt, GREEDY)]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_repetition_penalty_changes_greedy_output(tiny_llm):
    plain = tiny_llm.generate("Hello hello", GREEDY)[0].outputs[0].token_ids
    penalised = tiny_llm.generate("Hello hello", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                                repetition_penalty=5.0))[0].outputs[0].token_ids
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


def test_bad_requests_raise_clear_errors(tiny_llm):
    with pytest.raises(MiaotuiError, match="empty"):
        tiny_llm.generate("", GREEDY)
    with pytest.raises(MiaotuiError, match="context length"):
        tiny_llm.generate([5] * 300, GREEDY)
    with pytest.raises(MiaotuiError, match="maximum context length"):
        tiny_llm.generate("Hello", SamplingParams(max_tokens=1000))
    with pytest.raises(MiaotuiError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(MiaotuiError, match="temperature"):
        SamplingParams(temperature=-0.5)


def test_chat_uses_template(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0]
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
