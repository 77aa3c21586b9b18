"""Start `miaotui serve` as a real process on a free loopback port, and wait until it is healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_http_process(command: list[str], port: int, name: str, timeout: float = 120.0):
    """Start an HTTP server process (its output in a log file), wait until /health answers 200, yield
    (url, process); terminate it on the way out. A process that dies or never gets healthy is an
    error that quotes the end of its log."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def running_server(model: Path | str, *extra: str, timeout: float = 120.0):
    port = free_port()
    command = [sys.executable, "-m", "miaotui.cli", "serve", "-m", str(model), "--port", str(port), "--threads", "1",
               *extra]
    with running_http_process(command, port, "miaotui-serve", timeout) as (url, proc):
        yield url, proc
