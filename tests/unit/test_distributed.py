"""Distributed inference over loopback: TP, PP, DP and TP x PP give the single-process outputs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from miaotui.cli import main
from miaotui.distributed.tensor_parallel import even_split, head_plan

PROMPTS = ["hello world", "The quick brown fox jumps", "a"]
ROOT = Path(__file__).resolve().parents[2]


def generate(model, *parallel: str, max_tokens: int = 12) -> list[list[int]]:
    args = [sys.executable, "-m", "miaotui.cli", "generate", "-m", str(model), "--dtype", "float32",
            "--max-tokens", str(max_tokens), "--json", "--threads", "1", *parallel]
    for p in PROMPTS:
        args += ["-p", p]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return [o["token_ids"] for o in json.loads(done.stdout)]


def test_head_plans():
    assert head_plan(8, 4, 2, 1) == ([4, 5, 6, 7], [2, 3])  # whole groups when tp divides both
    # 9 query heads in 3 groups over 2 ranks: 5 + 4 query heads, each with its group's kv head.
    assert head_plan(9, 3, 2, 0) == ([0, 1, 2, 3, 4], [0, 0, 0, 1, 1])
    assert head_plan(9, 3, 2, 1) == ([5, 6, 7, 8], [1, 2, 2, 2])
    assert [even_split(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]


@pytest.fixture(scope="module")
def single(tiny_hf_dir):
    return generate(tiny_hf_dir)


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"], ["--dp", "2"], ["--tp", "2", "--pp", "2"],
                                      ["--tp", "3"]],  # 4 query / 2 kv heads over 3 ranks: the uneven rule
                         ids=lambda p: "".join(p))
def test_parallel_generation_equals_single_process(tiny_hf_dir, single, parallel):
    assert generate(tiny_hf_dir, *parallel) == single


def test_tensor_parallel_int8_weights(tiny_hf_dir, tmp_path):
    q = tmp_path / "int8"
    assert main(["quantize", "-m", str(tiny_hf_dir), "--method", "rtn", "--bits", "8", "--group-size", "-1",
                 "--symmetric", "-o", str(q)]) == 0
    assert generate(q, "--tp", "2") == generate(q)


def test_two_node_launch_over_a_rendezvous_endpoint(tiny_hf_dir, single):
    """The multi-node path on one host: two torchrun agents (one per "node", one process each) meet at a
    c10d rendezvous endpoint, exactly as two machines would; their TP=2 generation equals one process."""
    from miaotui.distributed.launch import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
            "-m", "miaotui.cli", "generate", "-m", str(tiny_hf_dir), "--dtype", "float32", "--max-tokens", "12",
            "--json", "--threads", "1", "--tp", "2"]
    for p in PROMPTS:
        args += ["-p", p]
    nodes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    printed = [out for out, _ in outputs if out.strip()]  # only global rank 0 prints
    assert len(printed) == 1
    assert [o["token_ids"] for o in json.loads(printed[0])] == single


def parallel_and_single_logits(model, out: Path, tp: int, pp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a fixed batch from a tp x pp model under torchrun (tests/unit/dist_logits.py), and
    from one process."""
    from miaotui import LLM

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
                           "--standalone", str(ROOT / "tests/unit/dist_logits.py"), str(model), str(out),
                           str(tp), str(pp)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    llm = LLM(str(model), dtype="float32", decode_weight_dtype="none")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
    with torch.inference_mode():
        ref = llm.model(ids, torch.arange(8)[None].expand(2, -1))
    return torch.load(out), ref


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_logits_match_under_torchrun(tiny_hf_dir, tmp_path, tp, pp):
    got, ref = parallel_and_single_logits(tiny_hf_dir, tmp_path / "logits.pt", tp, pp)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-3


def test_killed_worker_fails_fast_with_a_clear_error(tiny_hf_dir):
    args = [sys.executable, "-m", "miaotui.cli", "generate", "-m", str(tiny_hf_dir), "--dtype", "float32",
            "--max-tokens", "240", "--ignore-eos", "--threads", "1", "--tp", "2", "--stream", "-p", "x"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    child = None
    while child is None and time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        child = int(found[0]) if found else None
        time.sleep(0.2)
    assert child is not None
    assert proc.stdout.read(1)  # the first streamed text: both ranks loaded and generating
    subprocess.run(["kill", "-9", str(child)])
    killed_at = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 30
    assert proc.returncode == 2
    assert "distributed inference failed" in err and "Traceback" not in err


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"], ["--dp", "2"]], ids=lambda p: "".join(p))
def test_parallel_serve_passes_the_openai_client_tests(tiny_hf_dir, parallel):
    import openai

    from tests.unit import test_server
    from tests.unit.server_process import running_server

    with running_server(tiny_hf_dir, "--served-model-name", test_server.MODEL, "--api-key", test_server.KEY,
                        *parallel) as (url, proc):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=test_server.KEY, max_retries=0)
        test_server.test_models_and_completions(client)
        test_server.test_completions_n_seed_stop_logprobs_echo(client)
        test_server.test_chat_completions(client)
        # Greedy output equals the single-process engine's (with --dp, whichever replica ran it).
        expected = _single_process_text(tiny_hf_dir, "The quick brown", 8)
        for _ in range(3):
            r = client.completions.create(model=test_server.MODEL, prompt="The quick brown", max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].text == expected
        # A worker that dies turns the server unhealthy (and requests fail with a clear error).
        worker = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        subprocess.run(["kill", "-9", str(worker)])
        import httpx

        auth = {"Authorization": f"Bearer {test_server.KEY}"}
        killed_at = time.monotonic()
        deadline = killed_at + 30
        # (With --dp a request may still finish on the live replica until the loss is noticed.)
        while time.monotonic() < deadline:
            r = httpx.post(f"{url}/v1/completions", json={"model": test_server.MODEL, "prompt": "x",
                                                         "max_tokens": 4}, headers=auth, timeout=60)
            if r.status_code != 200:
                break
        assert r.status_code in (500, 503) and time.monotonic() - killed_at < 30
        while httpx.get(f"{url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert httpx.get(f"{url}/health").status_code == 503


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--dp", "2"]], ids=lambda p: "".join(p))
def test_idle_parallel_server_outlives_the_collective_timeout(tiny_hf_dir, parallel, monkeypatch):
    """Workers wait for steps in collectives that time out: an idle server must keep them alive."""
    import httpx

    from tests.unit.server_process import running_server

    monkeypatch.setenv("MIAOTUI_DIST_TIMEOUT_S", "5")
    with running_server(tiny_hf_dir, *parallel) as (url, proc):
        time.sleep(12)
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": str(tiny_hf_dir), "prompt": "x", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _single_process_text(model, prompt: str, max_tokens: int) -> str:
    from miaotui import LLM, SamplingParams

    llm = LLM(str(model))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(prompt, params)[0].outputs[0].text


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"], ["--dp", "2"]], ids=lambda p: "".join(p))
def test_parallel_bench(tiny_hf_dir, parallel):
    args = [sys.executable, "-m", "miaotui.cli", "bench", "-m", str(tiny_hf_dir), "--prompt-tokens", "16",
            "--gen-tokens", "4", "--batch", "2", "--repeat", "1", "--threads", "1", "--json", *parallel]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["batch"] == 2 and result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
    if "--dp" in parallel:  # two replicas of one row each, timed together
        assert result["data_parallel_size"] == 2 and len(result["replica_decode_tok_s"]) == 2
        assert result["decode_tok_s"] == pytest.approx(sum(result["replica_decode_tok_s"]))


def test_data_parallel_bench_needs_a_batch_the_replicas_share_evenly(tiny_hf_dir):
    done = subprocess.run([sys.executable, "-m", "miaotui.cli", "bench", "-m", str(tiny_hf_dir), "--batch", "3",
                           "--dp", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--batch 3 must be a multiple of --dp 2" in done.stderr
    assert "Traceback" not in done.stderr
