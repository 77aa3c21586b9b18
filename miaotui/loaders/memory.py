"""Will a model fit? The memory a load is about to need against what the machine has available,
checked before anything large is allocated: a clear error instead of the OOM killer.
Not for measuring what a load used (runtime.peak_rss_mb).
"""

from __future__ import annotations

from miaotui.errors import MiaotuiError

GB = 1e9


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_fits(need: int, what: str) -> None:
    """Raise MiaotuiError when `need` bytes of weights exceed the memory available."""
    have = available_bytes()
    if have is not None and need > have:
        raise MiaotuiError(f"'{what}' needs about {need / GB:.1f} GB of memory for its weights, and "
                           f"{have / GB:.1f} GB are available")
