"""LazyTensors: a checkpoint's tensors by name, each read from its (memory-mapped) file only when
asked for, and not kept: the model builder converts one tensor at a time to its final form (packed
integer layer or compute dtype), so a load holds the model plus one tensor, never a float copy of
the whole checkpoint. Not for deciding formats (gguf.py, hf.py) or building the model (models/).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any


class LazyTensors(Mapping[str, Any]):
    def __init__(self, readers: dict[str, Callable[[], Any]], numel: int = 0) -> None:
        self._readers = readers
        self.numel = numel  # values in all the tensors (safetensors: from the headers)

    def __getitem__(self, name: str) -> Any:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # (Mapping's own would read the tensor)
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)
