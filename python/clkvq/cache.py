"""The quantized KV cache (clkvq_cache) over numpy arrays.

Shapes follow include/clkvq.h: K/V of one sequence of one layer are
[n_kv_heads, n_tokens, head_dim] in the model's channel order; decode
queries are [n_seqs, n_q_heads, head_dim] (one per sequence) or
[n_seqs, n_queries, n_q_heads, head_dim] (multi-query and paged decode).
float16 inputs are converted to float32; every array is checked before the
C call. A Cache is not thread-safe (nor are two caches of one context used
from two threads at once, as in C).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _cl, _lib
from ._check import as_float, as_int, check_status, float_array, fptr, int32_array, out_array
from .config import PrecisionConfig
from .context import Context
from ._owned import Owned
from .errors import invalid
from .spec import Spec, layer_config
from .types import AttnTuning, Layout, LayerConfig, TuningSource

LayersArg = Union[str, Spec, LayerConfig, Sequence[Union[str, Spec, LayerConfig]]]


@dataclass(frozen=True)
class CacheMemory:
    """clkvq_cache_memory: what a cache allocates."""
    device_bytes: int
    quantized_bytes: int
    fp16_bytes: int
    bits_per_element: float


@dataclass(frozen=True)
class PoolStats:
    """clkvq_pool_stats of one layer (-1: unknown with runtime tables)."""
    block_size: int
    n_blocks: int
    used_blocks: int
    free_blocks: int
    shared_blocks: int
    block_bytes: int


def _layers(layers: LayersArg, n_layers: Optional[int], head_dim: Any,
            call: str) -> List[LayerConfig]:
    hd = head_dim if isinstance(head_dim, int) and not isinstance(head_dim, bool) else None
    if isinstance(layers, (str, Spec, LayerConfig)):
        if n_layers is None:
            raise invalid("give n_layers with a single scheme for every layer", call)
        lc = layer_config(layers, hd)
        return [lc] * as_int(n_layers, "n_layers", call, 1)
    try:
        out = [layer_config(x, hd) for x in layers]
    except TypeError:
        raise invalid(f"layers must be a spec, a LayerConfig or a list of them, not "
                      f"{type(layers).__name__}", call) from None
    if not out:
        raise invalid("no layers", call)
    if n_layers is not None and as_int(n_layers, "n_layers", call) != len(out):
        raise invalid(f"n_layers = {n_layers} but {len(out)} layer configs", call)
    return out


class _Plan:
    """A clkvq_cache_config and the arrays its pointers reach."""

    def __init__(self, layers: List[LayerConfig], n_seqs: int, capacity: int, n_kv_heads: int,
                 n_q_heads: int, head_dim: int, layout_k: Any, layout_v: Any, block_size: int,
                 n_blocks: int, runtime_tables: bool, call: str):
        self.arr = (_lib.LayerConfigC * len(layers))()
        self.keep: List[Any] = []
        dims = (as_int(n_kv_heads, "n_kv_heads", call), as_int(head_dim, "head_dim", call))
        for i, lc in enumerate(layers):
            c, k = lc.to_c(*dims, call=call)
            self.arr[i] = c
            self.keep.append(k)
        self.cfg = _lib.CacheConfigC(
            len(layers), as_int(n_seqs, "n_seqs", call), as_int(capacity, "capacity", call),
            dims[0], as_int(n_q_heads, "n_q_heads", call), dims[1],
            int(Layout.coerce(layout_k, "layout_k", call)),
            int(Layout.coerce(layout_v, "layout_v", call)), self.arr,
            as_int(block_size, "block_size", call), as_int(n_blocks, "n_blocks", call),
            int(bool(runtime_tables)))


def _memory(ctx: Context, plan: _Plan, call: str) -> CacheMemory:
    mem = _lib.CacheMemoryC()
    check_status(_lib.load().clkvq_cache_plan(ctx.handle, ctypes.byref(plan.cfg),
                                              ctypes.byref(mem)), ctx.handle, call)
    return CacheMemory(mem.device_bytes, mem.quantized_bytes, mem.fp16_bytes,
                       mem.bits_per_element)


class Cache(Owned):
    """A quantized KV cache of n_layers x n_seqs sequences of up to
    ``capacity`` tokens.

    ``layers``: a scheme spec (``"skvq:k2v1.5:g32:w128:s5"``, see
    :func:`clkvq.parse_spec`) or LayerConfig for every layer (then give
    ``n_layers``), or a list of them, one per layer. For a precision
    config file use :meth:`from_config`. ``block_size`` > 0 makes a paged
    cache (pages from a pool of ``n_blocks`` per layer; 0: enough for
    every sequence at capacity); ``runtime_tables`` lets the caller pass
    its own block tables to :meth:`append_paged` / :meth:`decode_paged`.
    n_q_heads defaults to n_kv_heads.
    """

    _NOUN = "cache"
    _CALL = "Cache"

    def __init__(self, ctx: Context, layers: LayersArg, *, n_layers: Optional[int] = None,
                 n_seqs: int = 1, capacity: int, n_kv_heads: int,
                 n_q_heads: Optional[int] = None, head_dim: int, layout_k: Any = "auto",
                 layout_v: Any = "auto", block_size: int = 0, n_blocks: int = 0,
                 runtime_tables: bool = False):
        call = "Cache"
        self._handle: Optional[int] = None
        self._bufs: Dict[str, _cl.DeviceBuffer] = {}
        if not isinstance(ctx, Context):
            raise invalid(f"ctx must be a clkvq.Context, not {type(ctx).__name__}", call)
        self.layers = _layers(layers, n_layers, head_dim, call)
        nq = n_kv_heads if n_q_heads is None else n_q_heads
        plan = _Plan(self.layers, n_seqs, capacity, n_kv_heads, nq, head_dim, layout_k,
                     layout_v, block_size, n_blocks, runtime_tables, call)
        lib = _lib.load()
        out = ctypes.c_void_p()
        check_status(lib.clkvq_cache_create(ctx.handle, ctypes.byref(plan.cfg),
                                            ctypes.byref(out)), ctx.handle, call)
        self._init(ctx, out.value, plan.cfg)  # type: ignore[arg-type]
        self._plan: Optional[_Plan] = plan

    def _init(self, ctx: Context, handle: int, cfg: _lib.CacheConfigC) -> None:
        self._ctx, self._handle, self._lib = ctx, handle, _lib.load()
        self.n_layers, self.n_seqs, self.capacity = cfg.n_layers, cfg.n_seqs, cfg.capacity
        self.n_kv_heads, self.n_q_heads, self.head_dim = cfg.n_kv_heads, cfg.n_q_heads, \
            cfg.head_dim
        self.block_size, self.runtime_tables = cfg.block_size, bool(cfg.runtime_tables)
        self.model: Optional[str] = None
        self.config_origin: Optional[str] = None
        ctx._adopt(self)

    @classmethod
    def for_model(cls, ctx: Context, model: str, *, n_seqs: int = 1, capacity: int,
                  layout_k: Any = "auto", layout_v: Any = "auto") -> "Cache":
        """A model's cache in one call (clkvq_cache_create_for_model): its
        config (the one stored with :meth:`PrecisionConfig.store`, else the
        shipped KVTuner preset that is its default; ``config_origin`` says
        which), its geometry, and tuned decode parameters per layer from
        this device's tuning results (:meth:`tuning_source` tells where
        from). An unknown model raises InvalidArgumentError listing the
        known ones."""
        call = "Cache.for_model"
        if not isinstance(ctx, Context):
            raise invalid(f"ctx must be a clkvq.Context, not {type(ctx).__name__}", call)
        if not isinstance(model, str) or not model:
            raise invalid(f"model must be a non-empty string, not {model!r}", call)
        ns, cap = as_int(n_seqs, "n_seqs", call), as_int(capacity, "capacity", call)
        lk = int(Layout.coerce(layout_k, "layout_k", call))
        lv = int(Layout.coerce(layout_v, "layout_v", call))
        lib = _lib.load()
        out = ctypes.c_void_p()
        check_status(lib.clkvq_cache_create_for_model(ctx.handle, model.encode(), ns, cap, lk,
                                                      lv, ctypes.byref(out)), ctx.handle, call)
        self = cls.__new__(cls)
        self._handle = None
        self._bufs = {}
        self._plan = None
        try:
            # the same lookup the C call made, for the layer settings and geometry
            with PrecisionConfig.for_model(model, ctx) as config:
                g = config.geometry
                assert g is not None  # clkvq_config_for_model records it
                self.layers = config.layers(g.n_kv_heads, g.head_dim)
                origin = config.origin
        except BaseException:
            lib.clkvq_cache_release(out.value)
            raise
        cfg = _lib.CacheConfigC(g.n_layers, ns, cap, g.n_kv_heads, g.n_q_heads, g.head_dim,
                                lk, lv, None, 0, 0, 0)
        self._init(ctx, out.value, cfg)  # type: ignore[arg-type]
        self.model, self.config_origin = model, origin
        return self

    @classmethod
    def from_config(cls, ctx: Context, config: Union[PrecisionConfig, str, "os.PathLike[str]"],
                    *, n_seqs: int = 1, capacity: int, n_kv_heads: int,
                    n_q_heads: Optional[int] = None, head_dim: int, layout_k: Any = "auto",
                    layout_v: Any = "auto", defaults: Any = None) -> "Cache":
        """A contiguous cache whose layers follow a precision config (a
        PrecisionConfig, or a YAML path loaded with ``defaults``):
        clkvq_cache_create_from_config. A per-head layer (KVTuner's
        per-head files) is stored as one share per (K, V) pair of its heads;
        its head count must be n_kv_heads."""
        call = "Cache.from_config"
        if not isinstance(ctx, Context):
            raise invalid(f"ctx must be a clkvq.Context, not {type(ctx).__name__}", call)
        owned = None
        if isinstance(config, (str, os.PathLike)):
            config = owned = PrecisionConfig.load(config, defaults, ctx)
        elif not isinstance(config, PrecisionConfig):
            raise invalid(f"config must be a PrecisionConfig or a path, not "
                          f"{type(config).__name__}", call)
        elif defaults is not None:
            raise invalid("defaults apply when loading a file: give them to "
                          "PrecisionConfig.load", call)
        try:
            nq = n_kv_heads if n_q_heads is None else n_q_heads
            args = [as_int(n_seqs, "n_seqs", call), as_int(capacity, "capacity", call),
                    as_int(n_kv_heads, "n_kv_heads", call), as_int(nq, "n_q_heads", call),
                    as_int(head_dim, "head_dim", call)]
            lk = int(Layout.coerce(layout_k, "layout_k", call))
            lv = int(Layout.coerce(layout_v, "layout_v", call))
            lib = _lib.load()
            out = ctypes.c_void_p()
            check_status(lib.clkvq_cache_create_from_config(ctx.handle, config.handle, *args,
                                                            lk, lv, ctypes.byref(out)),
                         ctx.handle, call)
            self = cls.__new__(cls)
            self._bufs = {}
            self._plan = None
            self.layers = config.layers(n_kv_heads, head_dim)
            cfg = _lib.CacheConfigC(config.n_layers, args[0], args[1], args[2], args[3],
                                    args[4], lk, lv, None, 0, 0, 0)
            self._init(ctx, out.value, cfg)  # type: ignore[arg-type]
            return self
        finally:
            if owned is not None:
                owned.close()

    @staticmethod
    def plan(ctx: Context, layers: LayersArg, *, n_layers: Optional[int] = None,
             n_seqs: int = 1, capacity: int, n_kv_heads: int, n_q_heads: Optional[int] = None,
             head_dim: int, layout_k: Any = "auto", layout_v: Any = "auto",
             block_size: int = 0, n_blocks: int = 0,
             runtime_tables: bool = False) -> CacheMemory:
        """clkvq_cache_plan: validates the arguments as the constructor would
        and reports what it would allocate (nothing is)."""
        call = "Cache.plan"
        lcs = _layers(layers, n_layers, head_dim, call)
        nq = n_kv_heads if n_q_heads is None else n_q_heads
        p = _Plan(lcs, n_seqs, capacity, n_kv_heads, nq, head_dim, layout_k, layout_v,
                  block_size, n_blocks, runtime_tables, call)
        return _memory(ctx, p, call)

    @property
    def memory(self) -> CacheMemory:
        """What this cache allocated (clkvq_cache_plan of its configuration)."""
        if self._plan is None:
            self._plan = _Plan(self.layers, self.n_seqs, self.capacity, self.n_kv_heads,
                               self.n_q_heads, self.head_dim, "auto", "auto", self.block_size,
                               0, self.runtime_tables, "Cache.memory")
        return _memory(self._ctx, self._plan, "Cache.memory")

    # ---- lifetime

    def close(self) -> None:
        """Releases the cache and its scratch buffers (idempotent)."""
        for b in self._bufs.values():
            b.release()
        self._bufs.clear()
        if self._handle is not None:
            self._lib.clkvq_cache_release(self._handle)
            self._handle = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_layers} layers x {self.n_seqs} seqs"
        return f"<clkvq.Cache {state}, capacity {self.capacity}>"

    # ---- helpers

    def _check(self, status: int, call: str) -> None:
        check_status(status, self._ctx.handle, call)

    def _kv(self, k, v, call: str) -> Tuple[np.ndarray, np.ndarray]:
        k = float_array(k, "k", call, (self.n_kv_heads, None, self.head_dim))
        v = float_array(v, "v", call, (self.n_kv_heads, k.shape[1], self.head_dim))
        return k, v

    def _scale(self, scale: Optional[float], call: str) -> float:
        if scale is None:
            return 1.0 / math.sqrt(self.head_dim)
        s = as_float(scale, "scale", call)
        if not math.isfinite(s):
            raise invalid(f"scale {s} is not finite", call)
        return s

    def _buf(self, name: str, nbytes: int) -> _cl.DeviceBuffer:
        b = self._bufs.get(name)
        if b is None:
            b = self._bufs[name] = _cl.DeviceBuffer(self._ctx.cl_context, self._ctx.cl_queue,
                                                    nbytes)
        else:
            b.ensure(nbytes)
        return b

    def _to_device(self, name: str, arr: np.ndarray) -> int:
        b = self._buf(name, arr.nbytes)
        b.write(arr)
        assert b.handle is not None
        return b.handle

    # ---- sequences

    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray) -> None:
        """Appends K and V ([n_kv_heads, n_tokens, head_dim]) to sequence seq
        of one layer. On any error the cache is exactly as it was."""
        call = "Cache.append"
        k, v = self._kv(k, v, call)
        self._check(self._lib.clkvq_cache_append(self.handle, as_int(layer, "layer", call),
                                                 as_int(seq, "seq", call), k.shape[1], fptr(k),
                                                 fptr(v)), call)

    def length(self, layer: int, seq: int) -> int:
        """Tokens stored for seq in layer."""
        call = "Cache.length"
        n = ctypes.c_int()
        self._check(self._lib.clkvq_cache_length(self.handle, as_int(layer, "layer", call),
                                                 as_int(seq, "seq", call), ctypes.byref(n)),
                    call)
        return n.value

    def truncate(self, seq: int, n_tokens: int = 0) -> None:
        """Keeps the first n_tokens of seq in every layer (0 clears it)."""
        call = "Cache.truncate"
        self._check(self._lib.clkvq_cache_truncate(self.handle, as_int(seq, "seq", call),
                                                   as_int(n_tokens, "n_tokens", call)), call)

    def read(self, layer: int, seq: int, k: bool = True,
             v: bool = True) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Reads seq of layer back as float32 [n_kv_heads, length, head_dim]
        (dequantized where quantized); k/v False skips that one (None)."""
        call = "Cache.read"
        n = self.length(layer, seq)
        shape = (self.n_kv_heads, n, self.head_dim)
        ko = np.empty(shape, dtype=np.float32) if k else None
        vo = np.empty(shape, dtype=np.float32) if v else None
        if ko is None and vo is None:
            return None, None
        self._check(self._lib.clkvq_cache_read(self.handle, layer, seq, fptr(ko), fptr(vo)),
                    call)
        return ko, vo

    def fork(self, seq_src: int, seq_dst: int) -> None:
        """Starts (empty) seq_dst as a copy of seq_src in every layer; pages
        are shared copy-on-write."""
        call = "Cache.fork"
        self._check(self._lib.clkvq_cache_fork(self.handle, as_int(seq_src, "seq_src", call),
                                               as_int(seq_dst, "seq_dst", call)), call)

    # ---- attention

    def decode(self, layer: int, q: np.ndarray, scale: Optional[float] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
        """Fused decode attention, one query per sequence: q [n_seqs,
        n_q_heads, head_dim] -> [n_seqs, n_q_heads, head_dim].
        softmax(scale q.K^T) V over every token of each sequence, straight
        from the packed codes; scale defaults to 1/sqrt(head_dim)."""
        call = "Cache.decode"
        shape = (self.n_seqs, self.n_q_heads, self.head_dim)
        q = float_array(q, "q", call, shape)
        o = out_array(out, "out", call, shape)
        self._check(self._lib.clkvq_cache_decode_host(self.handle, as_int(layer, "layer", call),
                                                      fptr(q), fptr(o),
                                                      self._scale(scale, call)), call)
        return o

    def decode_multi(self, layer: int, q: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
        """Multi-query decode (speculative verification): q [n_seqs,
        n_queries, n_q_heads, head_dim], 1 <= n_queries <= 16, the drafts'
        K/V appended first; query i of a sequence of length n attends to
        tokens 0 .. n - n_queries + i. Returns the same shape."""
        call = "Cache.decode_multi"
        q = float_array(q, "q", call, (self.n_seqs, None, self.n_q_heads, self.head_dim))
        out = np.empty(q.shape, dtype=np.float32)
        qm = self._to_device("q", q)
        om = self._buf("out", out.nbytes)
        self._check(self._lib.clkvq_cache_decode_multi(self.handle,
                                                       as_int(layer, "layer", call),
                                                       q.shape[1], qm, om.handle,
                                                       self._scale(scale, call)), call)
        om.read(out)
        return out

    def prefill(self, layer: int, seq: int, q: np.ndarray,
                scale: Optional[float] = None) -> np.ndarray:
        """Causal prefill attention for the last n_queries tokens of seq
        (already appended): q [n_q_heads, n_queries, head_dim] -> same shape."""
        call = "Cache.prefill"
        q = float_array(q, "q", call, (self.n_q_heads, None, self.head_dim))
        out = np.empty(q.shape, dtype=np.float32)
        self._check(self._lib.clkvq_cache_prefill_host(
            self.handle, as_int(layer, "layer", call), as_int(seq, "seq", call), q.shape[1],
            fptr(q), fptr(out), self._scale(scale, call)), call)
        return out

    # ---- pages

    def pool_stats(self, layer: int = 0) -> PoolStats:
        """The page pool of one layer."""
        call = "Cache.pool_stats"
        s = _lib.PoolStatsC()
        self._check(self._lib.clkvq_cache_pool_stats(self.handle, as_int(layer, "layer", call),
                                                     ctypes.byref(s)), call)
        return PoolStats(s.block_size, s.n_blocks, s.used_blocks, s.free_blocks,
                         s.shared_blocks, s.block_bytes)

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Runtime tables: copies pages src[i] to dst[i] in every layer."""
        call = "Cache.copy_blocks"
        s = int32_array(np.asarray(src), "src", call, (None,))
        d = int32_array(np.asarray(dst), "dst", call, (s.shape[0],))
        n = s.shape[0]
        self._check(self._lib.clkvq_cache_copy_blocks(
            self.handle, s.ctypes.data_as(ctypes.POINTER(ctypes.c_int)),
            d.ctypes.data_as(ctypes.POINTER(ctypes.c_int)), n), call)

    def _table(self, block_table, call: str) -> np.ndarray:
        return int32_array(block_table, "block_table", call, (self.n_seqs, None))

    def append_paged(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray,
                     block_table: np.ndarray) -> None:
        """Runtime tables: append through the caller's block table (int32
        [n_seqs, max_blocks] of page ids covering every token of seq)."""
        call = "Cache.append_paged"
        k, v = self._kv(k, v, call)
        t = self._table(block_table, call)
        km, vm = self._to_device("k", k), self._to_device("v", v)
        tm = self._to_device("table", t)
        self._check(self._lib.clkvq_cache_append_paged(
            self.handle, as_int(layer, "layer", call), as_int(seq, "seq", call), k.shape[1],
            km, vm, tm, t.shape[1]), call)

    def decode_paged(self, layer: int, q: np.ndarray, block_table: np.ndarray,
                     scale: Optional[float] = None) -> np.ndarray:
        """Runtime tables: multi-query decode (q as in :meth:`decode_multi`)
        over the pages the caller's block table names."""
        call = "Cache.decode_paged"
        q = float_array(q, "q", call, (self.n_seqs, None, self.n_q_heads, self.head_dim))
        t = self._table(block_table, call)
        out = np.empty(q.shape, dtype=np.float32)
        qm, tm = self._to_device("q", q), self._to_device("table", t)
        om = self._buf("out", out.nbytes)
        self._check(self._lib.clkvq_cache_decode_paged(
            self.handle, as_int(layer, "layer", call), q.shape[1], qm, om.handle,
            self._scale(scale, call), tm, t.shape[1]), call)
        om.read(out)
        return out

    # ---- tuning

    @property
    def tuning(self) -> AttnTuning:
        """The decode tunables in use (defaults resolved); assign an
        AttnTuning to override them, None to go back to the defaults."""
        t = _lib.AttnTuningC()
        self._check(self._lib.clkvq_cache_get_tuning(self.handle, ctypes.byref(t)),
                    "Cache.tuning")
        return AttnTuning.from_c(t)

    @tuning.setter
    def tuning(self, value: Optional[AttnTuning]) -> None:
        call = "Cache.tuning"
        if value is None:
            self._check(self._lib.clkvq_cache_set_tuning(self.handle, None), call)
            return
        if not isinstance(value, AttnTuning):
            raise invalid(f"tuning must be an AttnTuning or None, not {type(value).__name__}",
                          call)
        c = value.to_c()
        self._check(self._lib.clkvq_cache_set_tuning(self.handle, ctypes.byref(c)), call)

    def tuning_source(self, layer: int = 0) -> TuningSource:
        """Where the decode tunables of one layer come from, as the cache
        uses them (clkvq_cache_tuning_source): EXACT, NEAREST, VENDOR,
        BUILTIN, or CALLER under an assigned :attr:`tuning`."""
        call = "Cache.tuning_source"
        src = ctypes.c_int()
        self._check(self._lib.clkvq_cache_tuning_source(
            self.handle, as_int(layer, "layer", call), ctypes.byref(src)), call)
        return TuningSource(src.value)
