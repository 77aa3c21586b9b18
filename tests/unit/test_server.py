"""The HTTP server as a real process, driven by the official `openai` client and by raw HTTP."""

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from tests.unit.server_process import running_server

MODEL = "tiny"
KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    with running_server(tiny_hf_dir, "--served-model-name", MODEL, "--api-key", KEY, "--max-num-seqs", "16",
                        "--kv-cache-mb", "16", "--block-size", "8", "--max-body-mb", "0.01") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def test_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    streamed = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_n_seed_stop_logprobs_echo(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "Once upon"], max_tokens=5, n=2, seed=3,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=MODEL, prompt=["Hello", "Once upon"], max_tokens=5, n=2, seed=3,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    # What lm-evaluation-harness's local-completions sends to score a continuation.
    scored = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=1, temperature=0,
                                       logprobs=1, echo=True)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text.startswith("The quick brown fox")
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens).startswith("The quick brown fox")
    full = client.completions.create(model=MODEL, prompt="a b c", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    if len(text) > 3:
        stop = text[2:4]
        cut = client.completions.create(model=MODEL, prompt="a b c", max_tokens=20, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


def test_chat_completions(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert len(r.choices[0].logprobs.content) == 6 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_raw_http_errors(server, tiny_hf_dir):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/health").status_code == 200  # open without a key
    assert "miaotui_requests_total" in httpx.get(f"{url}/metrics").text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    cases = [
        ({"model": MODEL, "prompt": "hi", "max_tokens": 10_000}, 400, "maximum context length is 256 tokens", "prompt"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be", "temperature"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be an integer >= 1",
         "max_tokens"),
        ({"model": "gpt-4", "prompt": "hi"}, 404, "The model `gpt-4` does not exist", "model"),
        ({"model": MODEL}, 400, "'prompt' is required", "prompt"),
        ({"model": MODEL, "prompt": [99999]}, 400, "prompt token ids must be in", None),
        # say no, never ignore: a field the server does not implement is named
        ({"model": MODEL, "prompt": "hi", "best_of": 2}, 400, "unrecognized request field 'best_of'", "best_of"),
        ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4", "stop"),
        # valid JSON holding a lone UTF-16 surrogate
        ({"model": MODEL, "prompt": "\ud800 x"}, 400, "not valid Unicode", "prompt"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias values", None),
    ]
    for body, status, message, param in cases:  # (json.dumps escapes the surrogate: the body is valid JSON)
        r = httpx.post(f"{url}/v1/completions", content=json.dumps(body).encode(),
                       headers=auth | {"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["type"] == "invalid_request_error", err
        assert param is None or err["param"] == param, err
    advisory = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "user": "u-1", "metadata": {"k": "v"}, "store": False}
    assert httpx.post(f"{url}/v1/completions", json=advisory, headers=auth).status_code == 200
    for field, value in (("response_format", {"type": "xml"}), ("guided_regex", "(unclosed"),
                         ("stop", ["x"] * 5)):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}], field: value}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/chat/completions"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": []}, headers=auth)
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x" * 20_000}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_health_is_503_before_the_model_is_loaded(tiny_hf_dir):
    from fastapi.testclient import TestClient

    from miaotui.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(model=str(tiny_hf_dir)))
    client = TestClient(app)  # no lifespan: nothing loaded
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"model": str(tiny_hf_dir), "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def _greedy_body(prompt: str, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def test_64_concurrent_requests_match_sequential(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    bodies = [_greedy_body(" ".join(words[: 1 + i % 12]) * (1 + i % 3), 4 + i % 9) for i in range(64)]
    sequential = [httpx.post(f"{url}/v1/completions", json=b, headers=auth, timeout=120).json() for b in bodies[:8]]

    async def fire():
        async with httpx.AsyncClient(timeout=300) as ac:
            return await asyncio.gather(*[ac.post(f"{url}/v1/completions", json=b, headers=auth) for b in bodies])

    results = [r.json() for r in asyncio.run(fire())]
    for body, r in zip(bodies, results, strict=True):
        assert r["usage"]["completion_tokens"] == body["max_tokens"]
    for seq, conc in zip(sequential, results[:8], strict=True):
        assert seq["choices"][0]["text"] == conc["choices"][0]["text"]


def _kv_usage(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("miaotui_kv_cache_usage_ratio "):
            return float(line.split()[1])
    raise AssertionError("no kv usage metric")


def test_aborted_streams_free_their_blocks(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}

    async def one(ac: httpx.AsyncClient, i: int) -> str:
        body = {**_greedy_body(f"stream number {i}", 60), "stream": True}
        async with ac.stream("POST", f"{url}/v1/completions", json=body, headers=auth) as r:
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if i % 5 == 0 and chunks == 3:
                        return "aborted"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "done"
        return "incomplete"

    async def fire():
        async with httpx.AsyncClient(timeout=300) as ac:
            return await asyncio.gather(*[one(ac, i) for i in range(50)])

    outcomes = asyncio.run(fire())
    assert outcomes.count("aborted") == 10 and outcomes.count("done") == 40
    for _ in range(50):
        if _kv_usage(url) == 0.0:
            break
        threading.Event().wait(0.2)
    assert _kv_usage(url) == 0.0


def test_queue_full_gives_429(tiny_hf_dir):
    with running_server(tiny_hf_dir, "--served-model-name", MODEL, "--max-num-seqs", "1", "--max-queue", "2") as (
            url, _):
        async def fire():
            async with httpx.AsyncClient(timeout=300) as ac:
                return await asyncio.gather(*[ac.post(f"{url}/v1/completions", json=_greedy_body("hi", 40))
                                              for _ in range(12)])

        codes = [r.status_code for r in asyncio.run(fire())]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        rejected = next(r for r in asyncio.run(fire()) if r.status_code == 429)
        assert rejected.json()["error"]["type"] == "rate_limit_exceeded"


def test_sigterm_drains_in_flight_requests(tiny_hf_dir):
    with running_server(tiny_hf_dir, "--served-model-name", MODEL) as (url, proc):
        lines: list[str] = []

        def stream():
            with httpx.stream("POST", f"{url}/v1/completions", json={**_greedy_body("drain me", 120), "stream": True},
                              timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)

        t = threading.Thread(target=stream)
        t.start()
        t.join(timeout=120)
        # uvicorn re-raises the signal after its graceful shutdown: "killed by SIGTERM", after draining.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        events = [x for x in lines if x]
        data = [json.loads(x[6:]) for x in events if x.startswith("data: {")]
        assert events[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"


def test_bench_serve_against_the_server(server, capsys):
    from miaotui.cli import main

    url, _ = server
    assert main(["bench-serve", "--url", url, "--api-key", KEY, "--concurrency", "1,4", "--requests", "4",
                 "--input-len", "16", "--output-len", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["completed"] == 4 and r["failed"] == 0 and r["output_tok_s"] > 0
        assert r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["tpot_p50_ms"] > 0
    assert main(["bench-serve", "--url", "http://127.0.0.1:9", "--concurrency", "1"]) == 2


def test_bench_serve_at_a_request_rate_from_a_dataset(server, capsys, tmp_path):
    from miaotui.cli import main

    url, _ = server
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Question {i}?"},
                                                      {"from": "gpt", "value": "Answer."}]} for i in range(5)]))
    assert main(["bench-serve", "--url", url, "--api-key", KEY, "--concurrency", "8", "--request-rate", "20,50",
                 "--requests", "6", "--dataset", str(dataset), "--output-len", "6", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["request_rate"] for r in rows] == [20.0, 50.0]
    for r in rows:
        assert r["completed"] == 6 and r["failed"] == 0
        assert 0 < r["itl_p50_ms"] <= r["itl_p99_ms"] and 0 < r["e2e_p50_ms"] <= r["e2e_p99_ms"]
    assert main(["bench-serve", "--url", url, "--request-rate", "fast"]) == 2
    assert main(["bench-serve", "--url", url, "--api-key", KEY, "--dataset", str(tmp_path / "missing.json")]) == 2


def test_serves_compressed_checkpoints(tiny_hf_dir, tmp_path):
    """Whatever miaotui writes (pruned smaller, then 4-bit quantized) loads and serves."""
    from miaotui.cli import main

    pruned, quantized = tmp_path / "pruned", tmp_path / "q4"
    assert main(["prune", "-m", str(tiny_hf_dir), "--structured", "heads", "--sparsity", "0.5", "-o", str(pruned)]) == 0
    assert main(["quantize", "-m", str(pruned), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "-o", str(quantized)]) == 0
    with running_server(quantized, "--served-model-name", MODEL) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5


def test_server_with_prompt_lookup_speculation(tiny_hf_dir, client):
    """`serve --speculate ngram`: concurrent greedy requests give the plain server's texts, and the
    drafted / accepted token counts show on /metrics."""
    import concurrent.futures

    prompts = [f"{w} {w} {w} {w} {w} {w} and" for w in ("red blue", "one two three", "a b", "x y z w")]
    with running_server(tiny_hf_dir, "--served-model-name", MODEL, "--speculate", "ngram",
                        "--num-speculative-tokens", "4") as (url, _proc):
        spec = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def both(prompt):
            kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                      "extra_body": {"ignore_eos": True}}
            fast = spec.completions.create(**kwargs).choices[0].text
            return fast, client.completions.create(**kwargs).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for fast, plain in pool.map(both, prompts):
                assert fast == plain
        metrics = httpx.get(f"{url}/metrics").text
        accepted = next(float(line.split()[1]) for line in metrics.splitlines()
                        if line.startswith("miaotui_spec_decode_accepted_tokens "))
        assert accepted > 0


MIXED_PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog and", "a b c",
                 "你好，世界！模型推理 and more words here"]


def test_llm_generate_equals_the_server_and_one_by_one(tiny_hf_dir, client):
    """One decoding path: LLM.generate over a batch of mixed-length prompts gives the server's texts
    for the same prompts (same dtype and cache layout), and the texts of one prompt at a time."""
    from miaotui import LLM, SamplingParams

    llm = LLM(str(tiny_hf_dir), kv_cache_mb=16, block_size=8)  # the server fixture's engine options
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    batched = [o.outputs[0].text for o in llm.generate(MIXED_PROMPTS, params)]
    alone = [llm.generate(p, params)[0].outputs[0].text for p in MIXED_PROMPTS]
    served = [client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in MIXED_PROMPTS]
    assert batched == alone == served
    assert all(len(t) > 0 for t in batched)


def test_server_with_a_draft_model_matches_plain_decoding(tiny_hf_dir, client, tmp_path):
    """`serve --draft PATH`: 4 concurrent greedy requests speculate with a draft model (its own
    weights, the same tokenizer) and give the plain server's texts."""
    import concurrent.futures

    from tests.tiny_models import write_hf_dir

    draft = write_hf_dir(tmp_path / "draft", seed=1)
    with running_server(tiny_hf_dir, "--served-model-name", MODEL, "--draft", str(draft),
                        "--num-speculative-tokens", "3") as (url, _proc):
        spec = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        kwargs = {"model": MODEL, "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
        plain = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in MIXED_PROMPTS]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            fast = list(pool.map(lambda p: spec.completions.create(prompt=p, **kwargs).choices[0].text,
                                 MIXED_PROMPTS))
        assert fast == plain
        metrics = httpx.get(f"{url}/metrics").text
        drafted = next(float(line.split()[1]) for line in metrics.splitlines()
                       if line.startswith("miaotui_spec_decode_draft_tokens "))
        assert drafted > 0
