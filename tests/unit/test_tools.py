"""Tool calling and reasoning output: the parsers for each template family, and the real server
with the official client (required and named choices always parse; a whole round trip; streamed
tool-call deltas; reasoning_content split off, streamed too)."""

from __future__ import annotations

import json

import openai
import pytest

from miaotui.server.tools import ReasoningStream, ToolPlan, extract_tool_calls, split_reasoning
from tests.tiny_models import write_hf_dir
from tests.unit.server_process import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
# A Qwen-style template: tools in the system turn, <tool_call> blocks, <tool_response> turns, <think>
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tc in message.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}")


def test_auto_parsers_for_each_template_family():
    plan = ToolPlan([WEATHER, TIME], "auto")
    hermes = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n' \
             '</tool_call><tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    content, calls = extract_tool_calls(plan, hermes)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    content, calls = extract_tool_calls(plan, '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "CET"}}]')
    assert content is None and calls[0]["function"]["name"] == "get_time"
    content, calls = extract_tool_calls(plan, '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    assert extract_tool_calls(plan, "Just text {not a call}") == ("Just text {not a call}", [])
    assert extract_tool_calls(plan, '{"name": "unknown_fn", "parameters": {}}')[1] == []


def test_reasoning_is_split_whole_and_streamed():
    assert split_reasoning("<think>plan it</think>\n\nThe answer", False) == ("plan it", "The answer")
    assert split_reasoning("plain answer", False) == (None, "plain answer")
    assert split_reasoning("still thinking", True) == ("still thinking", "")
    stream, reasoning, content = ReasoningStream(False), "", ""
    for piece in ["<th", "ink>pl", "an it</th", "ink>", "The ", "answer"]:
        r, c = stream.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = stream.feed("", final=True)
    assert (reasoning + r, content + c) == ("plan it", "The answer")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # (a longer context than the shared tiny model's: tool schemas take many of its small vocabulary's tokens)
    directory = write_hf_dir(tmp_path_factory.mktemp("tools") / "tiny-tools", max_position_embeddings=2048)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    with running_server(directory, "--served-model-name", "tiny", "--dtype", "float32") as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_always_gives_calls(client, parallel):
    for seed in range(5):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[WEATHER, TIME],
            tool_choice="required", parallel_tool_calls=parallel, max_tokens=1000, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
            args = json.loads(call.function.arguments)
            assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"zone"})


def test_named_function_round_trip_streaming_and_not(client):
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice=named, max_tokens=120, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "unit"}
    # streamed: the client's deltas assemble into the same call
    stream = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                            tool_choice=named, max_tokens=120, temperature=0, stream=True)
    name, arguments, finish = "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", json.loads(call.function.arguments),
                                                     "tool_calls")
    # the call and the tool's answer go back in; the model answers in text
    history = messages + [reply.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=8, temperature=0,
        stream=True))
    assert streamed == answer.choices[0].message.content


def test_reasoning_content_separated_streaming_and_not(client):
    regex = r"<think>[a-z]{3,6}</think>[a-z]{2,5}"
    body = dict(model="tiny", messages=[{"role": "user", "content": "think"}], max_tokens=40, temperature=0,
                extra_body={"guided_regex": regex})
    reply = client.chat.completions.create(**body)
    message = reply.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning.isalpha() and message.content.isalpha()
    streamed_reasoning, streamed_content = "", ""
    for chunk in client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        streamed_content += delta.content or ""
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    off = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content is not None
