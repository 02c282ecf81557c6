"""Calibration dumps (safetensors with layers.<i>.q/k/v), through the C reader and writer."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._check import as_int, check_status, float_array, fptr
from .context import Context
from ._owned import Owned
from .errors import invalid

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class DumpInfo:
    """clkvq_dump_info."""
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    n_tokens: int
    head_dim: int
    model: str


class Dump(Owned):
    """A calibration dump opened by the C reader (mmap, every header field
    checked). ``Dump(ctx, path)``, or ``Dump.from_bytes(ctx, data)``."""

    _NOUN = "dump"
    _CALL = "Dump"

    def __init__(self, ctx: Context, path: PathLike):
        self._handle: Optional[int] = None
        self._data: Any = None
        out = ctypes.c_void_p()
        check_status(_lib.load().clkvq_dump_open(ctx.handle, os.fsencode(path),
                                                 ctypes.byref(out)), ctx.handle, "Dump")
        self._setup(ctx, out.value)  # type: ignore[arg-type]

    def _setup(self, ctx: Context, handle: int) -> None:
        self._ctx, self._handle, self._lib = ctx, handle, _lib.load()
        ctx._adopt(self)
        c = _lib.DumpInfoC()
        check_status(self._lib.clkvq_dump_info_get(handle, ctypes.byref(c)), ctx.handle,
                     "Dump.info")
        self.info = DumpInfo(c.n_layers, c.n_q_heads, c.n_kv_heads, c.n_tokens, c.head_dim,
                             c.model.decode("utf-8", "replace"))

    @classmethod
    def from_bytes(cls, ctx: Context, data: bytes) -> "Dump":
        """clkvq_dump_open_memory over a copy of data (kept alive with the Dump)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise invalid(f"data must be bytes, not {type(data).__name__}", "Dump.from_bytes")
        self = cls.__new__(cls)
        self._handle = None
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self._data = buf
        out = ctypes.c_void_p()
        check_status(_lib.load().clkvq_dump_open_memory(ctx.handle, buf, len(data),
                                                        ctypes.byref(out)), ctx.handle,
                     "Dump.from_bytes")
        self._setup(ctx, out.value)  # type: ignore[arg-type]
        return self

    def close(self) -> None:
        if self._handle is not None:
            self._lib.clkvq_dump_close(self._handle)
            self._handle = None
        self._data = None

    def read(self, layer: int, which: str) -> np.ndarray:
        """One tensor of a layer as float32: which = 'q' ([n_q_heads,
        n_tokens, head_dim]), 'k' or 'v' ([n_kv_heads, ...])."""
        call = "Dump.read"
        if which not in ("q", "k", "v"):
            raise invalid(f"which must be 'q', 'k' or 'v', not {which!r}", call)
        i = self.info
        heads = i.n_q_heads if which == "q" else i.n_kv_heads
        out = np.empty((heads, i.n_tokens, i.head_dim), dtype=np.float32)
        check_status(self._lib.clkvq_dump_read(self.handle, as_int(layer, "layer", call),
                                               which.encode(), fptr(out)), self._ctx.handle,
                     call)
        return out

    def __repr__(self) -> str:
        i = self.info
        return (f"<clkvq.Dump {i.model or '(no model)'}: {i.n_layers} layers x {i.n_tokens} "
                f"tokens, {i.n_q_heads}/{i.n_kv_heads} heads x {i.head_dim}>")


def write_dump(ctx: Context, path: PathLike, q: Sequence[np.ndarray], k: Sequence[np.ndarray],
               v: Sequence[np.ndarray], model: str = "", as_f16: bool = False) -> None:
    """clkvq_dump_write (atomic): per layer q [n_q_heads, n_tokens,
    head_dim], k and v [n_kv_heads, n_tokens, head_dim]; F32, or F16 when
    as_f16. NaN/Inf (and for F16 |x| > 65504) are refused."""
    call = "write_dump"
    if not (len(q) == len(k) == len(v)) or not q:
        raise invalid("q, k and v must be non-empty lists of one array per layer", call)
    q0 = float_array(q[0], "q[0]", call, (None, None, None))
    k0 = float_array(k[0], "k[0]", call, (None, q0.shape[1], q0.shape[2]))
    nq, nt, hd = q0.shape
    nk = k0.shape[0]
    qs = [float_array(x, f"q[{i}]", call, (nq, nt, hd)) for i, x in enumerate(q)]
    ks = [float_array(x, f"k[{i}]", call, (nk, nt, hd)) for i, x in enumerate(k)]
    vs = [float_array(x, f"v[{i}]", call, (nk, nt, hd)) for i, x in enumerate(v)]
    mb = model.encode()
    if len(mb) >= 128:
        raise invalid("model name must be under 128 bytes", call)
    info = _lib.DumpInfoC(len(qs), nq, nk, nt, hd, mb)
    ptrs = [(_lib.f32p * len(qs))(*[fptr(a) for a in arrs]) for arrs in (qs, ks, vs)]
    check_status(_lib.load().clkvq_dump_write(ctx.handle, os.fsencode(path), ctypes.byref(info),
                                              ptrs[0], ptrs[1], ptrs[2], int(bool(as_f16))),
                 ctx.handle, call)
