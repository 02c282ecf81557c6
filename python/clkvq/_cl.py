"""The few OpenCL calls the binding needs for the C API's cl_mem entry
points (multi-query and paged decode, paged append): device buffers in the
context's own cl_context, written and read on its own queue. The ICD
loader is the one libclkvq links (libOpenCL.so.1).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from ctypes import POINTER, c_int32, c_size_t, c_uint, c_uint64, c_void_p
from typing import Optional

import numpy as np

from .errors import ClkvqError, Status

CL_MEM_READ_WRITE = 1 << 0

_lock = threading.Lock()
_ocl: Optional[ctypes.CDLL] = None


def _load() -> ctypes.CDLL:
    global _ocl
    with _lock:
        if _ocl is None:
            name = ctypes.util.find_library("OpenCL") or "libOpenCL.so.1"
            lib = ctypes.CDLL(name)
            lib.clCreateBuffer.restype = c_void_p
            lib.clCreateBuffer.argtypes = [c_void_p, c_uint64, c_size_t, c_void_p,
                                           POINTER(c_int32)]
            for fn in (lib.clEnqueueWriteBuffer, lib.clEnqueueReadBuffer):
                fn.restype = c_int32
                fn.argtypes = [c_void_p, c_void_p, c_uint, c_size_t, c_size_t, c_void_p, c_uint,
                               c_void_p, c_void_p]
            lib.clReleaseMemObject.restype = c_int32
            lib.clReleaseMemObject.argtypes = [c_void_p]
            _ocl = lib
        return _ocl


def _fail(what: str, err: int) -> ClkvqError:
    return ClkvqError(Status.ERR_OPENCL, f"{what} failed with OpenCL error {err}")


class DeviceBuffer:
    """A cl_mem of `nbytes` in a clkvq context; grows by reallocation."""

    def __init__(self, cl_context: int, cl_queue: int, nbytes: int):
        self._ocl = _load()
        self._context, self._queue = cl_context, cl_queue
        self.handle: Optional[int] = None
        self.nbytes = 0
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> None:
        """At least nbytes (contents are not kept when it grows)."""
        nbytes = max(int(nbytes), 4)
        if self.handle is not None and self.nbytes >= nbytes:
            return
        self.release()
        err = c_int32(0)
        h = self._ocl.clCreateBuffer(self._context, CL_MEM_READ_WRITE, nbytes, None,
                                     ctypes.byref(err))
        if not h or err.value:
            raise _fail(f"clCreateBuffer({nbytes} bytes)", err.value)
        self.handle, self.nbytes = h, nbytes

    def write(self, arr: np.ndarray) -> None:
        assert arr.flags["C_CONTIGUOUS"] and arr.nbytes <= self.nbytes
        err = self._ocl.clEnqueueWriteBuffer(self._queue, self.handle, 1, 0, arr.nbytes,
                                             arr.ctypes.data, 0, None, None)
        if err:
            raise _fail("clEnqueueWriteBuffer", err)

    def read(self, arr: np.ndarray) -> None:
        assert arr.flags["C_CONTIGUOUS"] and arr.nbytes <= self.nbytes
        err = self._ocl.clEnqueueReadBuffer(self._queue, self.handle, 1, 0, arr.nbytes,
                                            arr.ctypes.data, 0, None, None)
        if err:
            raise _fail("clEnqueueReadBuffer", err)

    def release(self) -> None:
        if self.handle is not None:
            self._ocl.clReleaseMemObject(self.handle)
            self.handle, self.nbytes = None, 0

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass
