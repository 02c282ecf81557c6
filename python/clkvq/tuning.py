"""The decode tuning database: lookup (the chain the library follows) and show."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Tuple

from . import _lib
from ._check import as_int, check_status
from .context import Context
from .errors import invalid
from .types import AttnTuning, Format, Layout, Scheme, TuningSource


@dataclass(frozen=True)
class TuneShape:
    """clkvq_tune_shape: what a tuning result is for."""
    scheme: Any = Scheme.TOKEN
    format_k: Any = Format.Q4
    format_v: Any = Format.Q4
    group_size: int = 32
    head_dim: int = 128
    n_q_heads: int = 32
    n_kv_heads: int = 8
    tokens: int = 4096
    batch: int = 1

    def to_c(self) -> _lib.TuneShapeC:
        call = "TuneShape"
        return _lib.TuneShapeC(
            int(Scheme.coerce(self.scheme, "scheme", call)),
            int(Format.coerce(self.format_k, "format_k", call)),
            int(Format.coerce(self.format_v, "format_v", call)),
            *(as_int(getattr(self, n), n, call) for n in
              ("group_size", "head_dim", "n_q_heads", "n_kv_heads", "tokens", "batch")))

    @classmethod
    def from_c(cls, c: _lib.TuneShapeC) -> "TuneShape":
        return cls(Scheme(c.scheme), Format(c.format_k), Format(c.format_v), c.group_size,
                   c.head_dim, c.n_q_heads, c.n_kv_heads, c.tokens, c.batch)


@dataclass(frozen=True)
class TuneParams:
    """clkvq_tune_params: kernel tunables and cache layouts."""
    attn: AttnTuning
    layout_k: Layout
    layout_v: Layout


def tuning_lookup(ctx: Context, shape: TuneShape) -> Tuple[TuneParams, TuningSource]:
    """clkvq_tuning_lookup: exact, nearest, vendor or built-in parameters for a shape."""
    c_shape = shape.to_c()
    out = _lib.TuneParamsC()
    src = ctypes.c_int()
    check_status(_lib.load().clkvq_tuning_lookup(ctx.handle, ctypes.byref(c_shape),
                                                 ctypes.byref(out), ctypes.byref(src)),
                 ctx.handle, "tuning_lookup")
    return (TuneParams(AttnTuning.from_c(out.attn), Layout(out.layout_k), Layout(out.layout_v)),
            TuningSource(src.value))


def tuning_source_name(source: Any) -> str:
    """clkvq_tuning_source_name: "exact", "nearest", "vendor", "builtin" or
    "caller" for a TuningSource (or its value)."""
    call = "tuning_source_name"
    if isinstance(source, int) and not isinstance(source, (bool, TuningSource)):
        if source not in {int(m) for m in TuningSource}:
            raise invalid(f"no tuning source {source}", call)
        source = TuningSource(source)
    s = TuningSource.coerce(source, "source", call)
    return _lib.load().clkvq_tuning_source_name(int(s)).decode()


def tuning_show(ctx: Context) -> str:
    """clkvq_tuning_show: what is cached for the context's device, as text."""
    lib = _lib.load()
    status, text = _lib.capture_file_output(lambda f: lib.clkvq_tuning_show(ctx.handle, f))
    check_status(status, ctx.handle, "tuning_show")
    return text
