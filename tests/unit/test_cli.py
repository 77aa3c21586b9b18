"""The CLI contract: one-line errors with exit code 2 for bad input, atomic pulls, real output."""

import json
import os
import subprocess
import sys

import pytest

from miaotui.cli import main
from miaotui.loaders import model_store
from tests.tiny_models import write_gguf_from_hf_dir


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_file(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(tmp_path / "nope.gguf"))[::2], "not found")


def test_file_that_is_not_gguf(capsys, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(bogus))[::2], "not a GGUF file")


def test_truncated_gguf(capsys, tiny_hf_dir, tmp_path):
    path = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "t.gguf", truncate_to=60_000)
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(path))[::2], "truncated")


def test_tensor_types_nothing_runs_are_named_before_loading(capsys, tiny_hf_dir, tmp_path, monkeypatch):
    import struct

    import miaotui.loaders.gguf as gguf_loader

    path = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # then n_dims, dims, type
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(bytes(data))
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(unknown))[::2], "GGML type 99")

    def no_dequantizer(data, qtype):  # as for a type the gguf package reads but cannot decode
        raise NotImplementedError

    monkeypatch.setattr(gguf_loader, "dequantize", no_dequantizer)
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(path))[::2], "type F32")


def test_unsupported_architecture(capsys, tiny_hf_dir, tmp_path):
    path = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "f.gguf", arch="falcon")
    assert_one_line_error(*run_cli(capsys, "info", "-m", str(path))[::2], "falcon")


def test_prompt_longer_than_context(capsys, tiny_gguf):
    code, _, err = run_cli(capsys, "generate", "-m", str(tiny_gguf), "-p", "hello " * 400, "--max-tokens", "4")
    assert_one_line_error(code, err, "context length")


def test_empty_prompt(capsys, tiny_gguf):
    assert_one_line_error(*run_cli(capsys, "generate", "-m", str(tiny_gguf), "-p", "")[::2], "empty")


def test_negative_max_tokens(capsys, tiny_gguf):
    code, _, err = run_cli(capsys, "generate", "-m", str(tiny_gguf), "-p", "hi", "--max-tokens", "-3")
    assert_one_line_error(code, err, "--max-tokens")


def test_unwritable_cache_directory(capsys, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permission bits: make the cache path run through a regular file instead.
        blocker = tmp_path / "file"
        blocker.write_text("")
        monkeypatch.setenv("MIAOTUI_HOME", str(blocker / "cache"))
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        monkeypatch.setenv("MIAOTUI_HOME", str(locked))
    assert_one_line_error(*run_cli(capsys, "pull", "smollm2-135m")[::2], "not writable")


def test_interrupted_pull_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MIAOTUI_HOME", str(tmp_path))

    def interrupted_download(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store.subprocess, "run", interrupted_download)
    code, _, _ = run_cli(capsys, "pull", "smollm2-135m")
    assert code == 130
    leftovers = [p for p in (tmp_path / "models").rglob("*") if p.is_file() or p.name.startswith(".pull")]
    assert leftovers == []
    assert model_store.list_cached() == []


def test_generate_info_and_ppl_on_tiny_gguf(capsys, tiny_gguf, tmp_path):
    code, out, _ = run_cli(capsys, "generate", "-m", str(tiny_gguf), "-p", "Hello", "--max-tokens", "5")
    assert code == 0 and out.strip()
    code, out, _ = run_cli(capsys, "info", "-m", str(tiny_gguf), "--json")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "llama" and info["layers"] == 2 and info["params"] > 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, _ = run_cli(capsys, "eval", "ppl", "-m", str(tiny_gguf), "--text-file", str(text), "--ctx", "64",
                           "--json")
    result = json.loads(out)
    assert code == 0 and set(result) >= {"ppl", "tokens", "seconds"} and result["ppl"] > 1


def test_bench_json_keys(capsys, tiny_gguf):
    code, out, _ = run_cli(capsys, "bench", "-m", str(tiny_gguf), "--prompt-tokens", "16", "--gen-tokens", "4",
                           "--repeat", "2", "--json")
    result = json.loads(out)
    assert code == 0
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_p50_ms", "itl_p99_ms", "peak_rss_mb",
                "weight_bytes", "params"):
        assert result[key] > 0, key


def test_bench_times_decode_from_an_empty_context_as_llama_bench(capsys, tiny_gguf, monkeypatch):
    """--decode-prompt-tokens 1: prefill runs of their own, then decode runs after one-token prompts
    (llama-bench's tg test); each engine run's prompt length is as asked."""
    from miaotui.eval import bench

    lengths = []
    run_once = bench.run_once
    monkeypatch.setattr(bench, "run_once", lambda llm, prompts, gen: lengths.append((len(prompts[0]), gen))
                        or run_once(llm, prompts, gen))
    code, out, _ = run_cli(capsys, "bench", "-m", str(tiny_gguf), "--prompt-tokens", "16", "--gen-tokens", "4",
                           "--repeat", "2", "--decode-prompt-tokens", "1", "--json")
    result = json.loads(out)
    assert code == 0 and result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
    assert result["decode_prompt_tokens"] == 1
    assert lengths == [(16, 4), (16, 1), (16, 1), (1, 4), (1, 4)]  # warm-up, prefill runs, decode runs


def test_console_script_runs_as_a_process(tiny_gguf):
    proc = subprocess.run([sys.executable, "-m", "miaotui.cli", "generate", "-m", str(tiny_gguf), "-p", "",
                           "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "empty" in proc.stderr


def test_chat_keeps_history(tiny_gguf, monkeypatch, capsys):
    import io

    from miaotui.api import LLM

    seen: list[list[dict]] = []
    real = LLM.stream_chat

    def spy(self, messages, params=None):
        seen.append([dict(m) for m in messages])
        return real(self, messages, params)

    monkeypatch.setattr(LLM, "stream_chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n/exit\nnever read\n"))
    code, _, _ = run_cli(capsys, "chat", "-m", str(tiny_gguf), "--max-tokens", "4", "--temperature", "0")
    assert code == 0 and len(seen) == 2
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][0]["content"] == "hello" and seen[1][2]["content"] == "how are you"


@pytest.mark.parametrize("argv", [["eval", "ppl", "--text-file", "/nonexistent/file.txt"]])
def test_missing_text_file(capsys, tiny_gguf, argv):
    assert_one_line_error(*run_cli(capsys, *argv, "-m", str(tiny_gguf))[::2], "does not exist")


def test_unwritable_output_path_is_a_one_line_error(capsys, tiny_gguf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "export-gguf", "-m", str(tiny_gguf), "--type", "f32",
                           "-o", str(blocker / "sub" / "m.gguf"))
    assert_one_line_error(code, err, "sub")


def test_serve_on_a_taken_port_is_a_one_line_error(capsys, tiny_gguf):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "-m", str(tiny_gguf), "--port", str(port))
    assert_one_line_error(code, err, f"127.0.0.1:{port}")
