"""Small C kernels for what PyTorch's CPU ops do in several passes, built at first use.

`dequant.c` turns an int4 weight into the (K, N) float matrix of a prefill GEMM in one pass.
It is plain C (no PyTorch headers), compiled with the system's C compiler for this machine
(-O3 -march=native) into $QWEN2_HOME/kernels/<hash>/ and called through ctypes. The hash covers
the source, the flags and the CPU's feature flags, so a shared home directory never hands a
library built for another CPU to this one. Without a compiler (or with QWEN2_NO_KERNELS=1) every
caller falls back to its PyTorch version, which gives the same values (to one bf16 rounding) and
is slower: `available()` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("dequant.c")
# -ffp-contract=off: q * scale + offset rounded twice, as PyTorch computes it, on every compiler
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    from qwen2.demo import cache_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / key / "libqwen2kernels.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: a concurrent process never loads half a library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *_FLAGS, "-o", str(out), str(_SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed on {_SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QWEN2_NO_KERNELS") == "1":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None or platform.system() != "Linux":
        log.info("no C compiler found: quantized prefill uses the PyTorch dequantization")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("building qwen2's C kernels failed, using the PyTorch versions: %s", err)
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qwen2_dequant_int4.argtypes = [ptr, ptr, ptr, i64, i64, i64, cint, cint, cint]
    lib.qwen2_dequant_int4.restype = cint
    return lib


def available() -> bool:
    return _library() is not None


_OUT_DTYPES = (torch.bfloat16, torch.float32)


def _check_params(params: torch.Tensor) -> int:
    if params.dtype not in _OUT_DTYPES or not params.is_contiguous():
        raise ValueError(f"scales must be contiguous bf16 or float32, got {params.dtype}")
    return int(params.dtype == torch.bfloat16)


def dequantize_int4_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                      in_features: int, group_size: int, dtype: torch.dtype,
                      out: torch.Tensor | None = None, threads: int = 1) -> torch.Tensor | None:
    """W^T (in, out) from the int4 CPU kernel's packed layout, written into `out` if given; None if
    the C kernels are unavailable or the dtype is not one they write.

    One thread by default: between two GEMMs PyTorch's OpenMP workers keep spinning on the other
    cores, and a second thread of ours fights them for a core (in a 512-token int4 prefill of the demo
    model: 100 ms of dequantization with one thread, 170-190 ms with two, 80 ms with two when the
    workers sleep, which slows every other op)."""
    lib = _library()
    if lib is None or dtype not in _OUT_DTYPES or packed.dtype != torch.uint8 or not packed.is_contiguous():
        return None
    if scales_and_zeros.shape != (in_features // group_size, out_features, 2):
        raise ValueError(f"scales_and_zeros has shape {tuple(scales_and_zeros.shape)}, expected "
                         f"{(in_features // group_size, out_features, 2)}")
    if packed.numel() != out_features * in_features // 2:
        raise ValueError(f"packed int4 weight has {packed.numel()} bytes, expected {out_features * in_features // 2}")
    if out is None:
        out = torch.empty(in_features, out_features, dtype=dtype)
    elif out.shape != (in_features, out_features) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} ({in_features}, {out_features}) tensor")
    status = lib.qwen2_dequant_int4(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(),
                                    out_features, in_features, group_size, int(dtype == torch.bfloat16),
                                    _check_params(scales_and_zeros), threads)
    if status == 2:
        raise MemoryError(f"dequantizing an int4 weight {out_features}x{in_features}: out of memory")
    if status != 0:
        raise ValueError(f"int4 weight {out_features}x{in_features} with group {group_size}: unsupported shape")
    return out
