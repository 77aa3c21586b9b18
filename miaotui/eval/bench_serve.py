"""Load-test an OpenAI-compatible server: the figures of vLLM's `bench serve`.

For each concurrency level (or each request rate: Poisson arrivals, at most max_concurrency in
flight), N requests are streamed through /v1/completions: random token-id prompts of input_len
tokens, or the first human turns of a ShareGPT-style JSON file; exactly output_len tokens out
(ignore_eos). Reports request throughput, output tok/s, and percentiles of TTFT, TPOT (time per
output token after the first), ITL (each gap between streamed tokens) and end-to-end latency.
Works against miaotui and any server that takes token-id or text prompts. Not for in-process
benchmarks (bench.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx

from miaotui.errors import MiaotuiError


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load_dataset(path: str, limit: int, seed: int = 0) -> list[str]:
    """The first human turn of each conversation of a ShareGPT-style JSON file ([{"conversations":
    [{"from": "human", "value": ...}, ...]}, ...]; plain {"prompt": ...} items too), shuffled."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise MiaotuiError(f"cannot read the dataset '{path}': {exc}") from None
    prompts = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
            continue
        turns = item.get("conversations") or item.get("conversation") or [] if isinstance(item, dict) else []
        first = next((t.get("value") or t.get("content") for t in turns if isinstance(t, dict)
                      and t.get("from", t.get("role")) in ("human", "user")), None)
        if isinstance(first, str) and first.strip():
            prompts.append(first)
    if not prompts:
        raise MiaotuiError(f"the dataset '{path}' holds no prompts (ShareGPT conversations or {{'prompt': ...}})")
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(limit)]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "status": 500}
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                first = first or stamps[-1]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ok": True, "ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
            "latency": end - start, "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)]}


async def _level(url: str, model: str, concurrency: int, requests: int, input_len: int, output_len: int,
                 vocab: int, headers: dict[str, str], seed: int, rate: float | None = None,
                 prompts: list[str] | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [{"model": model, "prompt": prompts[i] if prompts else [rng.randrange(100, vocab) for _ in
                                                                    range(input_len)],
               "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    # Poisson arrivals: exponential gaps of mean 1 / rate (all at once without a rate)
    arrivals, at = [], 0.0
    for _ in bodies:
        arrivals.append(at)
        at += rng.expovariate(rate) if rate else 0.0

    async def run(body, delay: float):
        await asyncio.sleep(delay)
        async with gate:
            return await _one(client, url, body, headers)

    # A fresh connection per request: servers that close kept-alive connections after a few requests
    # (llama.cpp's, cpp-httplib) would otherwise race the client's reuse and drop a request.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*[run(b, d) for b, d in zip(bodies, arrivals, strict=True)])
        duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    itl = [gap for r in ok for gap in r["itl"]]
    return {"concurrency": concurrency, "request_rate": rate, "requests": requests, "completed": len(ok),
            "failed": len(results) - len(ok),
            "duration_s": duration, "request_throughput": len(ok) / duration, "output_tok_s": out_tokens / duration,
            "ttft_p50_ms": _percentile([r["ttft"] for r in ok], 50) * 1e3,
            "ttft_p99_ms": _percentile([r["ttft"] for r in ok], 99) * 1e3,
            "tpot_p50_ms": _percentile([r["tpot"] for r in ok], 50) * 1e3,
            "tpot_p99_ms": _percentile([r["tpot"] for r in ok], 99) * 1e3,
            "itl_p50_ms": _percentile(itl, 50) * 1e3, "itl_p99_ms": _percentile(itl, 99) * 1e3,
            "e2e_p50_ms": _percentile([r["latency"] for r in ok], 50) * 1e3,
            "e2e_p99_ms": _percentile([r["latency"] for r in ok], 99) * 1e3,
            "mean_latency_s": statistics.mean(r["latency"] for r in ok) if ok else float("nan")}


def bench_serve(url: str, concurrency: list[int], requests: int, input_len: int, output_len: int,
                api_key: str | None = None, seed: int = 0, rates: list[float] | None = None,
                dataset: str | None = None) -> list[dict[str, Any]]:
    """One row per concurrency level, or per request rate (then concurrency[0] caps the requests in
    flight)."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise MiaotuiError(f"cannot reach {url}: {exc}") from None
    if models.status_code != 200:
        raise MiaotuiError(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
    card = models.json()["data"][0]
    model, vocab = card["id"], int(card.get("vocab_size", 32000))  # miaotui's model card has vocab_size
    prompts = load_dataset(dataset, requests, seed) if dataset else None
    runs = [(level, None) for level in concurrency] if not rates else [(concurrency[0], r) for r in rates]
    rows = []
    for level, rate in runs:
        asyncio.run(_level(url, model, level, min(level, requests), 8, 4, vocab, headers, seed + 1))  # warm-up
        rows.append(asyncio.run(_level(url, model, level, requests, input_len, output_len, vocab, headers, seed,
                                       rate, prompts)))
    return rows
