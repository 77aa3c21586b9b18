"""The server against a schema fuzzer: schemathesis reads /openapi.json and sends what it generates
from it (boundary values, wrong types, missing and extra fields) to every endpoint, bounded in
time. No 5xx, no hang; every error an OpenAI-shaped body; the server keeps serving afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.unit.server_process import running_server

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")


@pytest.mark.skipif(not Path(SCHEMATHESIS).exists(), reason="schemathesis is not installed (make install)")
def test_fuzzed_requests_never_break_the_server(tiny_hf_dir, tmp_path):
    env = os.environ | {"SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    with running_server(tiny_hf_dir, "--served-model-name", "tiny", "--max-num-seqs", "8") as (url, _):
        done = subprocess.run([SCHEMATHESIS, "run", f"{url}/openapi.json", "--max-examples", "40",
                               "--checks", "not_a_server_error,openai_error_body", "--request-timeout", "60",
                               "--seed", "1"], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        # (in a scratch directory: schemathesis keeps a cache where it runs)
        assert done.returncode == 0, done.stdout[-4000:]
        assert "openai_error_body" in done.stdout or " passed" in done.stdout
        # still serving
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
