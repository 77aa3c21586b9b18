"""The text miaotui ships: the WikiText-2 raw test split, its default evaluation, calibration and training text.

Not for reading or tokenizing texts (compress/calibration.py, compress/training.py, eval/).
"""

from __future__ import annotations

from pathlib import Path

from miaotui.errors import MiaotuiError

WIKITEXT2_TEST = Path(__file__).resolve().parent / "wikitext-2-raw" / "wiki.test.raw"
BUILTIN_TEXTS = {"wikitext-2": WIKITEXT2_TEST}
# Perplexity is measured on the first 40 windows of 512 tokens (llama-perplexity's --chunks 40):
# calibration and training on the bundled text start after them unless told otherwise.
EVALUATED_TOKENS = 40 * 512


def text_path(name: str | Path | None, what: str = "text file") -> Path:
    """None or a built-in name ('wikitext-2') -> the bundled file; else the given file, which must exist."""
    if name is None or str(name) in BUILTIN_TEXTS:
        path = BUILTIN_TEXTS["wikitext-2" if name is None else str(name)]
        if not path.is_file():
            raise MiaotuiError(f"the bundled WikiText-2 text is missing at '{path}': reinstall miaotui")
        return path
    path = Path(name)
    if not path.is_file():
        raise MiaotuiError(f"{what} '{path}' does not exist")
    return path


def default_skip(path: Path, skip: int | None) -> int:
    """Tokens to skip before calibration / training text: as given, else past the evaluated tokens
    of the bundled text (so a model is never tuned on the tokens it is scored on), else 0."""
    if skip is not None:
        return skip
    return EVALUATED_TOKENS if path == WIKITEXT2_TEST else 0


def read_text(path: Path) -> str:
    """A text file's characters exactly as stored, line endings included (the bundled WikiText-2 keeps
    its CRLFs): what llama-perplexity and llama-imatrix read, so token counts and scores compare."""
    return path.read_bytes().decode("utf-8", errors="replace")
