"""Context (one OpenCL device and queue) and device listing."""

from __future__ import annotations

import ctypes
import threading
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional

from . import _lib
from ._check import as_int, check_status
from ._owned import Owned
from .errors import invalid


@dataclass(frozen=True)
class DeviceInfo:
    """clkvq_device_info."""
    platform: str
    vendor: str
    name: str
    driver_version: str
    device_version: str
    is_gpu: bool
    compute_units: int
    max_work_group_size: int
    local_mem_bytes: int
    global_mem_bytes: int
    max_alloc_bytes: int
    device_key: str


def list_devices() -> List[str]:
    """One line per OpenCL device, as clkvq_list_devices prints them:
    ``"<index>: <platform> / <device> (<type>)"``. The index is what
    ``Context(device=...)`` and $CLKVQ_DEVICE take."""
    lib = _lib.load()
    status, text = _lib.capture_file_output(lambda f: lib.clkvq_list_devices(f))
    check_status(status, None, "list_devices")
    return [line for line in text.splitlines() if line.strip()]


class Context(Owned):
    """A clkvq context: one OpenCL device, context and (profiling) queue.

    ``device``: None or "" reads $CLKVQ_DEVICE, then takes the first GPU,
    else the first device; an int (or decimal string) is an index into
    :func:`list_devices`; other text a case-insensitive substring of
    "<platform> <device name>". Usable as a context manager; caches,
    configs and dumps made on it keep it alive, and :meth:`close` closes
    them first.
    """

    _NOUN = "context"
    _CALL = "Context"

    def __init__(self, device: Optional[Any] = None):
        lib = _lib.load()
        if device is None:
            spec = None
        elif isinstance(device, bool):
            raise invalid("device must be an index or a name, not a bool", "Context")
        elif isinstance(device, int):
            spec = str(as_int(device, "device", "Context", 0)).encode()
        elif isinstance(device, str):
            spec = device.encode()
        else:
            raise invalid(f"device must be an index or a name, not {type(device).__name__}",
                          "Context")
        handle = ctypes.c_void_p()
        self._handle: Optional[int] = None
        self._lock = threading.Lock()
        self._children: "weakref.WeakSet[Any]" = weakref.WeakSet()
        check_status(lib.clkvq_context_create(ctypes.byref(handle), spec), None, "Context")
        self._handle = handle.value
        self._lib = lib

    @classmethod
    def wrap(cls, cl_context: Any, cl_device: Any, cl_queue: Any) -> "Context":
        """clkvq_context_wrap: a context over a runtime's own OpenCL objects
        (ints, or objects with an ``int_ptr`` as pyopencl's), retained by
        the library and released with this context."""
        def ptr(x: Any, name: str) -> int:
            v = getattr(x, "int_ptr", x)
            if isinstance(v, bool) or not isinstance(v, int) or v == 0:
                raise invalid(f"{name} must be a non-NULL OpenCL handle", "Context.wrap")
            return v

        lib = _lib.load()
        self = cls.__new__(cls)
        self._handle, self._lock, self._children = None, threading.Lock(), weakref.WeakSet()
        self._lib = lib
        handle = ctypes.c_void_p()
        check_status(lib.clkvq_context_wrap(ctypes.byref(handle), ptr(cl_context, "cl_context"),
                                            ptr(cl_device, "cl_device"),
                                            ptr(cl_queue, "cl_queue")), None, "Context.wrap")
        self._handle = handle.value
        return self

    # ---- lifetime

    def _adopt(self, child: Any) -> None:
        self._children.add(child)

    def close(self) -> None:
        """Releases the context after everything made on it."""
        with self._lock:
            if self._handle is None:
                return
            for child in list(self._children):
                child.close()
            self._lib.clkvq_context_release(self._handle)
            self._handle = None

    # ---- queries

    def last_error(self) -> str:
        """clkvq_last_error: the detail of the last failing call on this context."""
        msg = self._lib.clkvq_last_error(self.handle)
        return msg.decode("utf-8", "replace") if msg else ""

    @property
    def device_info(self) -> DeviceInfo:
        c = _lib.DeviceInfoC()
        check_status(self._lib.clkvq_context_device_info(self.handle, ctypes.byref(c)),
                     self.handle, "device_info")
        d = lambda b: b.decode("utf-8", "replace")  # noqa: E731
        return DeviceInfo(d(c.platform), d(c.vendor), d(c.name), d(c.driver_version),
                          d(c.device_version), bool(c.is_gpu), c.compute_units,
                          c.max_work_group_size, c.local_mem_bytes, c.global_mem_bytes,
                          c.max_alloc_bytes, d(c.device_key))

    def last_device_ms(self) -> float:
        """Device time (ms) of the kernels the last call enqueued; -1 without profiling."""
        return float(self._lib.clkvq_last_device_ms(self.handle))

    def copy_bandwidth(self, nbytes: int = 64 << 20, reps: int = 5) -> float:
        """Copy bandwidth in GB/s (clkvq_copy_bandwidth)."""
        gbps = ctypes.c_double()
        check_status(self._lib.clkvq_copy_bandwidth(
            self.handle, as_int(nbytes, "nbytes", "copy_bandwidth", 1, 1 << 62),
            as_int(reps, "reps", "copy_bandwidth", 1), ctypes.byref(gbps)), self.handle,
            "copy_bandwidth")
        return gbps.value

    @property
    def cl_context(self) -> int:
        return int(self._lib.clkvq_context_cl_context(self.handle) or 0)

    @property
    def cl_device(self) -> int:
        return int(self._lib.clkvq_context_cl_device(self.handle) or 0)

    @property
    def cl_queue(self) -> int:
        return int(self._lib.clkvq_context_cl_queue(self.handle) or 0)

    def __repr__(self) -> str:
        if self.closed:
            return "<clkvq.Context closed>"
        info = self.device_info
        return f"<clkvq.Context {info.platform} / {info.name}>"


_default: Optional[Context] = None
_default_lock = threading.Lock()


def default_context() -> Context:
    """A process-wide Context on the default device, made on first use."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Context()
        return _default
