"""No leaks over 10k create/append/decode/free cycles: tracemalloc on the
Python side, the process's resident memory for the C side (the library,
the OpenCL driver and its buffers)."""

import gc
import tracemalloc

import numpy as np

import clkvq
from conftest import HD, NKV, NQ

CYCLES = 10_000
WARMUP = 300


def rss_bytes():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE")


def test_create_append_decode_free_cycles(ctx):
    k, v = clkvq.synth_kv(1, (NKV, 40, HD))
    q = np.ones((1, NQ, HD), np.float32)

    def cycle(i):
        c = clkvq.Cache(ctx, "token:k4v4:g32", n_layers=1, capacity=64, n_kv_heads=NKV,
                        n_q_heads=NQ, head_dim=HD)
        c.append(0, 0, k, v)
        c.decode(0, q)
        if i % 2:
            c.close()  # half closed explicitly, half left to the garbage collector

    for i in range(WARMUP):
        cycle(i)
    gc.collect()
    tracemalloc.start()
    py0, rss0 = tracemalloc.get_traced_memory()[0], rss_bytes()
    for i in range(CYCLES):
        cycle(i)
    gc.collect()
    py1, rss1 = tracemalloc.get_traced_memory()[0], rss_bytes()
    tracemalloc.stop()
    # a cache holds ~12 KiB of device buffers: 10k leaked caches would be > 100 MiB
    assert py1 - py0 < 256 << 10, f"Python heap grew {py1 - py0} bytes"
    assert rss1 - rss0 < 16 << 20, f"resident memory grew {(rss1 - rss0) >> 10} KiB"
