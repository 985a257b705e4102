"""Import without PyTorch, the module's exports, CPU detection and the
dispatcher's choices (including KT_KERNEL_BACKEND)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kt_kernel


def _python(code: str, env=None):
    e = dict(os.environ)
    e.pop("KT_KERNEL_BACKEND", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_import_without_torch():
    r = _python("import sys; sys.modules['torch'] = None\n"
                "import numpy as np, kt_kernel\n"
                "w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=64,"
                " moe_intermediate_size=64, cpuinfer_threads=1, method='AMXINT8')\n"
                "assert isinstance(w.gpu_experts_mask, np.ndarray)\n"
                "rng = np.random.default_rng(0)\n"
                "w.load_weights_from_tensors(*(rng.standard_normal(s, dtype=np.float32) for s in"
                " [(4, 64, 64)] * 3))\n"
                "y = w.forward(rng.standard_normal((3, 64), dtype=np.float32), np.array([[0, 1]] * 3),"
                " np.ones((3, 2), np.float32))\n"
                "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
                "print(y.shape)")
    assert r.returncode == 0, r.stderr
    assert "(3, 64)" in r.stdout


def test_exports():
    for name in ("KTMoEWrapper", "generate_gpu_experts_masks", "__version__", "PACKED_LAYOUT_VERSION"):
        assert hasattr(kt_kernel, name)
    assert isinstance(kt_kernel.PACKED_LAYOUT_VERSION, int) and kt_kernel.PACKED_LAYOUT_VERSION >= 1


def test_cpu_info():
    info = kt_kernel.cpu_info()
    assert info["cores"] >= 1 and info["logical_cpus"] >= info["cores"]
    assert info["numa_nodes"] and all(n["cpus"] for n in info["numa_nodes"])
    assert set(info["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_permitted"}
    # Cross-check a few flags with the kernel's own view.
    with open("/proc/cpuinfo") as f:
        linux_flags = next(line for line in f if line.startswith("flags")).split()
    assert info["flags"]["avx2"] == ("avx2" in linux_flags)
    assert info["flags"]["avx512f"] == ("avx512f" in linux_flags)
    assert info["flags"]["amx_tile"] == ("amx_tile" in linux_flags)


def test_backends_order_and_availability():
    names = kt_kernel.backends()
    known = kt_kernel._kt_kernel.known_backends()
    assert known == ["amx", "avx512", "avx2", "scalar", "amx-emu"]
    assert "scalar" in names
    assert names == [n for n in known if n in names]  # preference order
    flags = kt_kernel.cpu_info()["flags"]
    if "avx512" in names:
        assert flags["avx512f"] and flags["avx512_vnni"]
    if "amx" in names:
        assert flags["amx_tile"] and flags["amx_permitted"]
    else:
        reason = kt_kernel._kt_kernel.backend_unavailable_reason("amx")
        assert reason
    # Automatic choice: the first available, never amx-emu.
    r = _python("import kt_kernel; print(kt_kernel.current_backend())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == [n for n in names if n != "amx-emu"][0]


@pytest.mark.parametrize("name", kt_kernel.backends())
def test_env_forces_backend(name):
    r = _python("import numpy as np, kt_kernel\n"
                "w = kt_kernel.KTMoEWrapper(layer_idx=0, num_experts=2, num_experts_per_tok=1, hidden_size=64,"
                " moe_intermediate_size=64, cpuinfer_threads=1, method='BF16')\n"
                "w.load_weights_from_tensors(*(np.ones(s, np.float32) for s in [(2, 64, 64)] * 3))\n"
                "w.forward(np.ones((1, 64), np.float32), np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32))\n"
                "print(kt_kernel.last_used_backend())", env={"KT_KERNEL_BACKEND": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_forcing_unavailable_backend_is_a_clear_error():
    unavailable = [n for n in kt_kernel._kt_kernel.known_backends() if n not in kt_kernel.backends()]
    for name in unavailable + ["bogus"]:
        r = _python("import kt_kernel\n"
                    "try:\n    kt_kernel.current_backend()\nexcept ValueError as e:\n    print('ERR', e)",
                    env={"KT_KERNEL_BACKEND": name})
        assert r.returncode == 0, r.stderr  # no crash, no SIGILL
        assert r.stdout.startswith("ERR KT_KERNEL_BACKEND:") and name in r.stdout
