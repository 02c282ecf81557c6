"""Model geometry: the library's table of common models and the explicit
``q32:kv8:d128:l32`` form for any other (clkvq_model_*)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Dict, Optional, Union

from . import _lib
from ._check import as_int, check_status
from .errors import invalid


@dataclass(frozen=True)
class ModelGeometry:
    """clkvq_model_geometry: the shape of a model's KV cache, what a cache,
    a tuning shape and a precision config must agree on. ``str(g)`` is the
    explicit form, ``"q32:kv8:d128:l32"``."""
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_q_heads", "n_kv_heads", "head_dim"):
            object.__setattr__(self, name, as_int(getattr(self, name), name, "ModelGeometry"))

    def to_c(self) -> _lib.ModelGeometryC:
        return _lib.ModelGeometryC(self.n_layers, self.n_q_heads, self.n_kv_heads,
                                   self.head_dim)

    @classmethod
    def from_c(cls, c: _lib.ModelGeometryC) -> "ModelGeometry":
        return cls(c.n_layers, c.n_q_heads, c.n_kv_heads, c.head_dim)

    @classmethod
    def parse(cls, text: str) -> "ModelGeometry":
        """clkvq_model_parse: ``"q32:kv8:d128:l32"`` (every part once, any
        order); errors name the part."""
        call = "ModelGeometry.parse"
        if not isinstance(text, str):
            raise invalid(f"a geometry is a string, not {type(text).__name__}", call)
        out = _lib.ModelGeometryC()
        check_status(_lib.load().clkvq_model_parse(text.encode(), ctypes.byref(out)), None, call)
        return cls.from_c(out)

    def __str__(self) -> str:
        c = self.to_c()
        lib = _lib.load()
        n = lib.clkvq_model_format(ctypes.byref(c), None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.clkvq_model_format(ctypes.byref(c), buf, len(buf))
        return buf.value.decode()


def _name(name: object, call: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise invalid(f"a model name is a non-empty string, not {name!r}", call)
    return name.encode()


def model_lookup(name: str) -> ModelGeometry:
    """clkvq_model_lookup: a model of the table by name, matched without
    case, organisation prefix or "-Instruct" ("meta-llama/Llama-3.1-8B-Instruct").
    An unknown name raises InvalidArgumentError listing the known ones."""
    call = "model_lookup"
    out = _lib.ModelGeometryC()
    check_status(_lib.load().clkvq_model_lookup(_name(name, call), ctypes.byref(out)), None,
                 call)
    return ModelGeometry.from_c(out)


def model_canonical(name: str) -> Optional[str]:
    """The table's own name for name ("llama-3.1-8b"), None when unknown."""
    r = _lib.load().clkvq_model_canonical(_name(name, "model_canonical"))
    return r.decode() if r else None


def models() -> Dict[str, ModelGeometry]:
    """The model table, in its order: name -> geometry."""
    lib = _lib.load()
    out: Dict[str, ModelGeometry] = {}
    for i in range(lib.clkvq_model_count()):
        name = lib.clkvq_model_name(i).decode()
        out[name] = model_lookup(name)
    return out


def model_geometry(model: Union[str, ModelGeometry]) -> ModelGeometry:
    """A geometry from a ModelGeometry, a model name of the table, or the
    explicit form ``"q32:kv8:d128:l32"`` (as clkvq-tune's --model takes)."""
    if isinstance(model, ModelGeometry):
        return model
    call = "model_geometry"
    key = _name(model, call)
    if _lib.load().clkvq_model_canonical(key):
        return model_lookup(model)
    if ":" in model:
        return ModelGeometry.parse(model)
    return model_lookup(model)  # raises, listing the known names


__all__ = ["ModelGeometry", "model_lookup", "model_canonical", "models", "model_geometry"]
