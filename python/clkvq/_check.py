"""Argument checks made before any C call, and the status -> exception step."""

from __future__ import annotations

import ctypes
import operator
from typing import Optional, Sequence, Tuple

import numpy as np

from . import _lib
from .errors import invalid, make_error

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def check_status(status: int, ctx_handle: Optional[int], call: str) -> None:
    """Raises the exception for a non-OK status with the library's message
    (clkvq_last_error of the context the call used; NULL: this thread's)."""
    if status == 0:
        return
    lib = _lib.load()
    msg = lib.clkvq_last_error(ctx_handle)
    raise make_error(status, msg.decode("utf-8", "replace") if msg else "", call)


def as_int(value, name: str, call: str, lo: int = -(1 << 31), hi: int = (1 << 31) - 1) -> int:
    """A Python int (bool excluded, numpy integers accepted) within [lo, hi]."""
    if isinstance(value, bool):
        raise invalid(f"{name} must be an integer, not a bool", call)
    try:
        v = operator.index(value)
    except TypeError:
        raise invalid(f"{name} must be an integer, not {type(value).__name__}", call) from None
    if not lo <= v <= hi:
        raise invalid(f"{name} = {v} is outside [{lo}, {hi}]", call)
    return v


def as_float(value, name: str, call: str) -> float:
    if isinstance(value, bool):
        raise invalid(f"{name} must be a number, not a bool", call)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise invalid(f"{name} must be a number, not {type(value).__name__}", call) from None


def _shape_text(shape: Sequence[Optional[int]]) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def float_array(x, name: str, call: str, shape: Sequence[Optional[int]]) -> np.ndarray:
    """x as a C-contiguous float32 array of the given shape (None: any size).

    Accepts float32 and float16 numpy arrays (float16 is converted); any
    other dtype, a non-contiguous array, a wrong rank or size raises
    InvalidArgumentError naming the argument. Nothing is copied for a
    contiguous float32 array.
    """
    if not isinstance(x, np.ndarray):
        raise invalid(f"{name} must be a numpy array, not {type(x).__name__}", call)
    if x.dtype not in FLOAT_DTYPES:
        raise invalid(f"{name} has dtype {x.dtype}; float32 or float16 expected "
                      "(convert with .astype(np.float32))", call)
    if x.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, x.shape)):
        raise invalid(f"{name} has shape {list(x.shape)}; {_shape_text(shape)} expected", call)
    if not x.flags["C_CONTIGUOUS"]:
        raise invalid(f"{name} is not C-contiguous (use np.ascontiguousarray)", call)
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    return x


def int32_array(x, name: str, call: str, shape: Sequence[Optional[int]],
                lo: Optional[int] = None, hi: Optional[int] = None) -> np.ndarray:
    """x as a C-contiguous int32 array (any integer dtype whose values fit)."""
    if not isinstance(x, np.ndarray):
        raise invalid(f"{name} must be a numpy array, not {type(x).__name__}", call)
    if x.dtype.kind not in "iu":
        raise invalid(f"{name} has dtype {x.dtype}; an integer array (int32) expected", call)
    if x.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, x.shape)):
        raise invalid(f"{name} has shape {list(x.shape)}; {_shape_text(shape)} expected", call)
    if not x.flags["C_CONTIGUOUS"]:
        raise invalid(f"{name} is not C-contiguous (use np.ascontiguousarray)", call)
    if x.dtype != np.int32:
        if x.size and (x.min() < -(1 << 31) or x.max() >= (1 << 31)):
            raise invalid(f"{name} holds values that do not fit int32", call)
        x = x.astype(np.int32)
    if x.size and lo is not None and int(x.min()) < lo:
        raise invalid(f"{name} holds {int(x.min())}, below {lo}", call)
    if x.size and hi is not None and int(x.max()) > hi:
        raise invalid(f"{name} holds {int(x.max())}, above {hi}", call)
    return x


def out_array(out, name: str, call: str, shape: Tuple[int, ...]) -> np.ndarray:
    """A caller's output array (float32, C-contiguous, exact shape) or a new one."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise invalid(f"{name} must be a float32 numpy array", call)
    if tuple(out.shape) != tuple(shape):
        raise invalid(f"{name} has shape {list(out.shape)}; {list(shape)} expected", call)
    if not out.flags["C_CONTIGUOUS"] or not out.flags["WRITEABLE"]:
        raise invalid(f"{name} must be C-contiguous and writeable", call)
    return out


def fptr(x: Optional[np.ndarray]):
    """float * of an array (NULL for None)."""
    if x is None:
        return None
    return x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def iptr(x: Optional[np.ndarray]):
    """int32_t * of an array (NULL for None)."""
    if x is None:
        return None
    return x.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
