"""The ``torch.<device>`` module verl gets from ``get_torch_device()`` on the cpu platform.

verl calls CUDA-style memory, RNG and stream functions on the device module (``empty_cache``,
``max_memory_allocated``, ``mem_get_info``, ``get_rng_state``, ``reset_peak_memory_stats``, ...).
``torch.cpu`` has the stream/event API but not those, so this module adds them: memory figures come
from the process's resident set (psutil), cache/statistics calls are no-ops and the RNG is torch's
global CPU generator. Anything else is looked up on ``torch.cpu``.
"""

from __future__ import annotations

import platform
import resource

import psutil
import torch


def __getattr__(name: str):
    return getattr(torch.cpu, name)


def is_available() -> bool:
    return True


def current_device() -> str:
    # verl builds ``torch.device(get_device_id())``; "cpu" (not 0, which means "cuda:0") keeps it on CPU.
    return "cpu"


def device_count() -> int:
    return 1


def set_device(device=None) -> None:
    pass


def synchronize(device=None) -> None:
    pass


def get_device_name(device=None) -> str:
    return platform.processor() or "CPU"


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


manual_seed_all = manual_seed


def get_rng_state(device=None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device=None) -> None:
    torch.set_rng_state(state)


def empty_cache() -> None:
    pass


def ipc_collect() -> None:
    pass


def set_per_process_memory_fraction(fraction: float, device=None) -> None:
    pass


def reset_peak_memory_stats(device=None) -> None:
    pass


def reset_accumulated_memory_stats(device=None) -> None:
    pass


def memory_allocated(device=None) -> int:
    """Resident set size of this process, in bytes (CPU tensors live there)."""
    return psutil.Process().memory_info().rss


memory_reserved = memory_allocated


def max_memory_allocated(device=None) -> int:
    """Peak resident set size of this process, in bytes (Linux reports ``ru_maxrss`` in KiB and
    updates it lazily, so the current size can be ahead of it)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, memory_allocated())


max_memory_reserved = max_memory_allocated


def mem_get_info(device=None) -> tuple[int, int]:
    """``(free, total)`` host memory in bytes, like ``torch.cuda.mem_get_info``."""
    memory = psutil.virtual_memory()
    return memory.available, memory.total
