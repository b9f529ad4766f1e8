"""CPU kernels pinned to one instruction set, so that float results do not depend on the host.

Every stage calls ``pin_cpu_numerics`` as its first statement. Torch- and numpy-free on
purpose: the settings are environment variables that ATen, MKL, oneDNN and OpenBLAS read
when they load, so they must be set before the first ``import torch`` or ``import numpy``.
"""

from __future__ import annotations

import os
import platform
import sys

# Demo training is chaotic: over its 1,600 steps a last-bit difference in one matmul grows into
# a different model. ATen and MKL choose their kernels by the CPU's instruction set (AVX2,
# AVX-512), so one seed trained different weights on different hosts (measured with 2,400
# steps: 42 vs 43 of 49 twins answered, indeterminate 0.86 vs 0.79, on an AVX-512 and an
# AVX2-only host). Their AVX2 branches exist on every x86-64 CPU since 2013 and give the same
# bits on all of them; the env vars are read when torch and MKL load. Inference is no different
# from training at the level of bits: a steered generation on one host took another token than
# on the other, and every output after the model stage changed hash. numpy's and scipy's
# OpenBLAS (the geometry stage's linear algebra) pick their kernels by CPU too; Haswell is
# their AVX2 kernel set. numpy's own loops (exp, log, tanh, sin, cos in float32 and float64)
# dispatch by CPU as well, and its AVX-512 loops give other last bits than its AVX2 ones
# (measured on numpy 2.4: float64 exp and log1p, float32 exp, sin, cos and tanh); disabling its
# AVX-512 targets leaves X86_V3, the AVX2 loops an AVX2-only host runs (a target the host lacks is
# ignored, so the setting is harmless there).
CPU_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
# The price, on an AVX-512 host (2 cores, SmolLM2-135M float32, measured 2026-12-06): forward
# passes 570-580 tokens/s pinned against 830-910 with the host's AVX-512 kernels, generation
# 1.25x slower. REFUSAL_ATLAS_CPU_KERNELS=native skips the pin: faster on such a host, and
# outputs (hence dvc.lock) that only a host with the same kernels reproduces bit for bit.
OPT_OUT = "REFUSAL_ATLAS_CPU_KERNELS"


def on_x86_64() -> bool:
    """Whether this host is x86-64, the only one ``CPU_NUMERICS`` applies to."""
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_numerics() -> None:
    """Pin CPU kernels to ``CPU_NUMERICS`` (x86-64 only; a value the user set is kept; nothing
    when ``REFUSAL_ATLAS_CPU_KERNELS=native``).

    Must run before torch and numpy are imported, or it could not take effect.
    """
    choice = os.environ.get(OPT_OUT, "portable")
    if choice not in ("portable", "native"):
        raise SystemExit(
            f"{OPT_OUT}={choice!r}: expected 'portable' (the default: the same bits on any x86-64 host) or 'native' "
            "(the host's fastest kernels); unset it or set one of those"
        )
    if not on_x86_64() or choice == "native":
        return
    if loaded := [m for m in ("torch", "numpy") if m in sys.modules]:
        raise RuntimeError(
            f"pin_cpu_numerics() must run before {' and '.join(loaded)} {'are' if len(loaded) > 1 else 'is'} imported; "
            "call it first in the process"
        )
    for key, value in CPU_NUMERICS.items():
        os.environ.setdefault(key, value)
