"""Host memory that is freed stays in the process (Linux, glibc malloc).

glibc serves every allocation above 32 MiB with its own mmap and hands it back to the
kernel on free. A training step on CPU allocates and frees tensors of that size many
times over (GPT-2's 50,257-way logits: 16 x 24 positions are 77 MB; SFT's 16 x 128 are
411 MB), so each of them comes back as fresh pages that the kernel must fault in and
zero, page by page. Measured on 2 cores: copying a 77 MB tensor took 18 ms this way and 4 ms
from memory the process kept; the LM head's matrix product 34 ms and 16 ms; a whole PPO
iteration of the IMDB task 1.73 s and 1.07 s (scripts/bench_ppo_vs_trl.py, BENCHMARKS.md).

keep_freed_memory() tells malloc (mallopt) to serve every block from its heap and not to
return freed memory to the kernel, the effect PyTorch's CPU performance guides get from
preloading jemalloc or tcmalloc, without another library or a restart. stages.common.open_run
calls it for every run on CPU (a process-wide setting: it stays for the process's life).

The price is memory. The process keeps its peak heap, and blocks of many different sizes
fragment it: the PPO benchmark (nearly fixed shapes) peaked at 1.1 GiB resident against
0.9 GiB, but 300 steps of an LM head on random shapes (1-16 rows x 8-128 positions)
peaked at 3.3 GiB against 2.0 GiB with glibc's defaults (and ran 1.7x faster). Where
memory is short, GPT2RLHF_MALLOC=default leaves malloc as it is (PyTorch's own
THP_MEM_ALLOC_ENABLE=1, set before torch is imported, recovers part of the speed without
keeping the heap: that soak ran 1.1x faster than the default, at the same peak).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Once per process; True when malloc took the settings (Linux with glibc), False
    where it does not apply (other systems, another C library, GPT2RLHF_MALLOC=default)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("GPT2RLHF_MALLOC", "keep") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
