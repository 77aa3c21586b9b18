"""The OpenAI API beyond plain completions: OpenAI's penalties and logit bias (formulas), minimum
lengths, /tokenize and /detokenize, /v1/embeddings against transformers' hidden states, model
names and aliases, vLLM's metric names, tool-call turns in the history."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from miaotui.engine.sampler import adjust_logits
from miaotui.engine.sampling_params import SamplingParams
from tests.unit.server_process import running_server


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.randn(10)
    generated = [3, 3, 3, 7]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = adjust_logits(logits, p, None, generated, set())
    expected = logits.clone()
    expected[3] -= 3 * 0.25 + 0.5
    expected[7] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(got, expected)


def test_logit_bias_bans_and_forces_and_min_tokens_holds_the_end():
    logits = torch.randn(10)
    banned = adjust_logits(logits, SamplingParams(logit_bias={int(logits.argmax()): -100}), None, [], set())
    assert int(banned.argmax()) != int(logits.argmax())
    forced = adjust_logits(logits, SamplingParams(logit_bias={int(logits.argmin()): 100}), None, [], set())
    assert int(forced.argmax()) == int(logits.argmin())
    held = adjust_logits(logits, SamplingParams(min_tokens=3), None, [1, 2], {4, 9})
    assert held[4] == float("-inf") and held[9] == float("-inf") and held[0] == logits[0]
    assert torch.equal(adjust_logits(logits, SamplingParams(min_tokens=3), None, [1, 2, 5], {4}), logits)


def test_engine_honours_logit_bias_and_min_tokens(tiny_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = tiny_llm.generate([[5, 17, 42]], greedy)[0].outputs[0].token_ids
    banned = tiny_llm.generate([[5, 17, 42]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                             logit_bias={plain[0]: -100}))[0].outputs[0].token_ids
    assert banned[0] != plain[0]
    forced = tiny_llm.generate([[5, 17, 42]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                             logit_bias={77: 100}))[0].outputs[0].token_ids
    assert forced == [77] * 4
    stop = tiny_llm.tokenizer.eos_token_ids[0]
    ended = tiny_llm.generate([[5, 17, 42]], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=5,
                                                            logit_bias={stop: 100}))[0].outputs[0]
    assert len(ended.token_ids) == 6 and ended.finish_reason == "stop"  # 5 held, then the forced end


@pytest.fixture(scope="module")
def served(tiny_hf_dir):
    with running_server(tiny_hf_dir, "--dtype", "float32") as (url, _):
        yield url


def test_default_name_is_the_base_name_and_aliases(served, tiny_hf_dir):
    models = httpx.get(f"{served}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [tiny_hf_dir.name]
    assert httpx.get(f"{served}/v1/models/{tiny_hf_dir.name}").json()["id"] == tiny_hf_dir.name
    assert httpx.get(f"{served}/v1/models/nope").status_code == 404
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)
    for name in (tiny_hf_dir.name, str(tiny_hf_dir)):  # the argument as given is an alias
        assert client.completions.create(model=name, prompt="hi", max_tokens=2).model == tiny_hf_dir.name


def test_tokenize_and_detokenize_round_trip(served, tiny_llm):
    text = "Hello, 世界! def main():"
    got = httpx.post(f"{served}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == tiny_llm.tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert len(got["token_strs"]) == got["count"] and got["max_model_len"] > 0
    back = httpx.post(f"{served}/detokenize", json={"tokens": got["tokens"]}).json()
    assert back["prompt"] == text
    chat = httpx.post(f"{served}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tiny_llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert httpx.post(f"{served}/detokenize", json={"tokens": [10**6]}).status_code == 400


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_equal_transformers_pooled_hidden_states(served, tiny_hf_dir, pooling):
    import transformers

    reference = transformers.AutoModel.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)
    texts = ["The quick brown fox", "hello"]
    out = client.embeddings.create(model=tiny_hf_dir.name, input=texts, extra_body={"pooling": pooling})
    tokenizer = httpx.post(f"{served}/tokenize", json={"prompt": texts[0]}).json()["tokens"]
    assert out.usage.prompt_tokens >= len(tokenizer)
    for text, item in zip(texts, out.data, strict=True):
        ids = httpx.post(f"{served}/tokenize", json={"prompt": text}).json()["tokens"]
        with torch.no_grad():
            hidden = reference(torch.tensor([ids])).last_hidden_state[0]
        vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
        expected = torch.nn.functional.normalize(vector, dim=0)
        torch.testing.assert_close(torch.tensor(item.embedding), expected, atol=1e-4, rtol=0)
    raw = httpx.post(f"{served}/v1/embeddings", json={"model": tiny_hf_dir.name, "input": "hello",
                                                      "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, out.data[1].embedding, atol=1e-6)


def test_vllm_metric_names_and_tool_turns_in_history(served, tiny_hf_dir):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model=tiny_hf_dir.name, messages=history, max_tokens=3,
                                           presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100})
    assert reply.choices[0].message.role == "assistant"
    text = httpx.get(f"{served}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total",
                 "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:kv_cache_usage_perc", "vllm:request_success_total",
                 "miaotui_requests_total"):
        assert name in text, name
    assert f'model_name="{tiny_hf_dir.name}"' in text
