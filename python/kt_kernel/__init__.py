"""kt_kernel: CPU Mixture-of-Experts kernels for hybrid GPU/CPU inference.

Importing never requires PyTorch and never executes an instruction the CPU
lacks: the native module is compiled for baseline x86-64, and kernels for
AVX2, AVX-512 and AMX are chosen at run time (see `backends()`).
"""

from __future__ import annotations

from typing import List

from . import _kt_kernel
from .masks import generate_gpu_experts_masks
from .wrapper import KTMoEWrapper, SUPPORTED_METHODS

__version__ = "0.1.0"
PACKED_LAYOUT_VERSION: int = _kt_kernel.PACKED_LAYOUT_VERSION

__all__ = [
    "KTMoEWrapper",
    "generate_gpu_experts_masks",
    "__version__",
    "PACKED_LAYOUT_VERSION",
    "SUPPORTED_METHODS",
    "cpu_info",
    "backends",
    "set_backend",
    "current_backend",
    "last_used_backend",
    "phase_times",
]


def cpu_info() -> dict:
    """Instruction-set flags, cores, NUMA nodes with their CPUs, cache sizes."""
    return _kt_kernel.cpu_info()


def backends() -> List[str]:
    """Available backends in preference order: some of "amx", "avx512", "avx2",
    "scalar", then "amx-emu" (AMX kernels over an emulated tile unit, for
    tests; never chosen automatically)."""
    return list(_kt_kernel.backends())


def set_backend(name: str) -> None:
    """Forces a backend for later calls ("" = automatic). Raises ValueError if
    it is unknown or unavailable here. KT_KERNEL_BACKEND does the same from the
    environment."""
    _kt_kernel.set_backend(name)


def current_backend() -> str:
    """The backend the next layer call will use. Raises ValueError if
    KT_KERNEL_BACKEND names an unavailable backend."""
    return _kt_kernel.current_backend()


def last_used_backend() -> str:
    """The backend whose kernels ran in the most recent layer call ("" if none)."""
    return _kt_kernel.last_used_backend()


def phase_times(reset: bool = False) -> dict:
    """Where layer calls spend their time: seconds summed over every internal pass of every layer
    since the last reset, per step (routing, encode_x, gate_up, encode_h, down, combine), and the
    pass count ("passes"). reset=True also starts the totals again. See bench/phase_profile.py."""
    return dict(_kt_kernel.phase_times(reset))
