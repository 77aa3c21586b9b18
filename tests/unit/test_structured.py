"""Structured outputs inside the continuous batch (llguidance masks): JSON schemas, json_object,
regexes, choices, GBNF grammars, through the real server and the official client; plain requests
running beside them keep their outputs."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from miaotui import SamplingParams
from miaotui.engine.structured import Constraint
from tests.unit.server_process import running_server

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["name", "age", "tags", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]},
                                      "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}, "maxItems": 4}},
     "required": ["ok", "level", "scores"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    with running_server(tiny_hf_dir, "--served-model-name", "tiny", "--max-num-seqs", "64", "--dtype",
                        "float32") as (url, _):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)


def test_100_json_schema_requests_validate_and_plain_ones_beside_them_are_unchanged(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)
    plain_prompts = [f"Story {i}: once upon a time" for i in range(50)]

    async def plain(prompt: str) -> str:
        r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text

    async def structured(i: int):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Record {i} as JSON"}], max_tokens=200,
            temperature=0.9, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"r{i % 2}", "schema": schema,
                                                                    "strict": True}})
        return schema, r.choices[0]

    async def everything():
        alone = await asyncio.gather(*(plain(p) for p in plain_prompts))
        mixed = await asyncio.gather(*(structured(i) for i in range(100)), *(plain(p) for p in plain_prompts))
        return alone, mixed[:100], mixed[100:]

    alone, shaped, beside = asyncio.run(everything())
    for schema, choice in shaped:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert beside == alone


def test_json_object_regex_choice_and_grammar(client):
    obj = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=120,
                                         temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(model="tiny", prompt="Phone:", max_tokens=20, temperature=0,
                                      extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", regex.choices[0].text)
    choice = client.completions.create(model="tiny", prompt="Yes or no?", max_tokens=5, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    gbnf = client.completions.create(model="tiny", prompt="Count:", max_tokens=30, temperature=0.7, seed=3,
                                     extra_body={"grammar": 'root ::= ("one" | "two") (", " ("one" | "two")){0,3}'})
    assert re.fullmatch(r"(one|two)(, (one|two)){0,3}", gbnf.choices[0].text)


def test_bad_structured_requests_are_400s(client):
    def status(**extra) -> tuple[int, str | None]:
        try:
            client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=extra)
        except openai.BadRequestError as exc:
            return exc.status_code, exc.body.get("param") if isinstance(exc.body, dict) else None
        return 200, None

    assert status(response_format={"type": "yaml"}) == (400, "response_format")
    assert status(guided_json="{not json") == (400, "guided_json")
    assert status(guided_regex="[0-9]", guided_choice=["a"])[0] == 400
    assert status(structured_outputs={"json": {"type": "object"}, "regex": "a"}) == (400, "structured_outputs")


def test_python_api_takes_a_constraint(tiny_llm):
    out = tiny_llm.generate(["pick"], SamplingParams(temperature=0, max_tokens=8,
                                                     structured=Constraint("choice", ["alpha", "beta"])))
    assert out[0].outputs[0].text in ("alpha", "beta")
