"""The CPU allocator setting ``ief`` runs under (glibc): freed tensors stay with the process.

glibc's malloc serves blocks from 128 KiB up (its start-up threshold, raised on the fly to the
largest block freed so far) by a fresh ``mmap`` and gives them back to the system when they are
freed, and it trims the top of its heap when more than twice that threshold is free there. A
training step allocates and frees the same multi-MB tensors every step (activations, per-sample
gradient blocks, Gram temporaries), so without a fixed setting each step faults those pages in
again: on one CPU thread that was 15-30% of an iEF step on the small conv nets and the
transformer encoder of ``ief bench --model`` (e.g. encoder iEF/SGD 2.4 -> 1.8, resnet-gn
2.2 -> 1.6). :func:`tune_cpu_allocator` sets both thresholds once, as jemalloc / tcmalloc
(what PyTorch's CPU performance guide recommends preloading) would behave: blocks up to 32 MiB
(glibc's largest mmap threshold) come from the heap and the heap is trimmed only above 1 GiB
free. The resident set then stays at the run's peak instead of shrinking between steps, as the
CUDA caching allocator does on a GPU.

``ief`` calls it at start-up; a library user's own process can call it too. Nothing is changed
when ``IEF_CPU_ALLOCATOR=system`` is set, when the user already configured malloc
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES=glibc.malloc...``, or a
preloaded jemalloc / tcmalloc via ``LD_PRELOAD``), or off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["tune_cpu_allocator", "state", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "OPT_OUT_ENV"]

MMAP_THRESHOLD = 32 << 20  # glibc's maximum for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 1 << 30
OPT_OUT_ENV = "IEF_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_applied = False
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _user_configured(environ) -> bool:
    if any(k in environ for k in _USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = environ.get("LD_PRELOAD", "")
    return "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload


def tune_cpu_allocator(environ=None) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module doc). Returns True
    when they were set; False (nothing changed) when opted out, already configured, or not glibc."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or env.get(OPT_OUT_ENV, "") == "system" or _user_configured(env):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt means something else or nothing
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    global _applied
    _applied = _applied or ok
    return ok


def state() -> str:
    """"tuned" when :func:`tune_cpu_allocator` set the thresholds in this process, else "system"
    (what ``ief bench`` records beside its timings)."""
    return "tuned" if _applied else "system"
