"""The exception every failing call raises."""

from __future__ import annotations

import enum
from typing import Optional


class Status(enum.IntEnum):
    """clkvq_status, by the names of include/clkvq.h."""

    OK = 0
    ERR_INVALID_ARG = 1
    ERR_UNSUPPORTED = 2
    ERR_NO_DEVICE = 3
    ERR_OPENCL = 4
    ERR_BUILD = 5
    ERR_OUT_OF_MEMORY = 6
    ERR_NONFINITE = 7
    ERR_BUFFER_TOO_SMALL = 8
    ERR_IO = 9
    ERR_CORRUPT = 10
    ERR_DEVICE_LIMIT = 11
    ERR_OUT_OF_BLOCKS = 12


class ClkvqError(Exception):
    """A clkvq call failed.

    ``status`` is the :class:`Status`, ``status_name`` its C name
    (``"CLKVQ_ERR_NONFINITE"``) and ``message`` the detail the library left
    in ``clkvq_last_error`` (or, for a check this package makes before any
    C call, its own). Invalid arguments raise :class:`InvalidArgumentError`,
    which is also a ``ValueError``.
    """

    def __init__(self, status: int, message: str, call: Optional[str] = None):
        try:
            self.status = Status(status)
            self.status_name = "CLKVQ_" + self.status.name
        except ValueError:
            self.status = status  # type: ignore[assignment]
            self.status_name = f"CLKVQ_ERR_{status}"
        self.message = message
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{self.status_name}: {message}" if message
                         else f"{where}{self.status_name}")


class InvalidArgumentError(ClkvqError, ValueError):
    """CLKVQ_ERR_INVALID_ARG, from the library or from this package's own checks."""


class NonFiniteError(ClkvqError, ValueError):
    """CLKVQ_ERR_NONFINITE: NaN, Inf or |x| > 65504 in the input."""


class OutOfBlocksError(ClkvqError):
    """CLKVQ_ERR_OUT_OF_BLOCKS: the page pool has too few free pages (nothing changed)."""


_BY_STATUS = {Status.ERR_INVALID_ARG: InvalidArgumentError,
              Status.ERR_NONFINITE: NonFiniteError,
              Status.ERR_OUT_OF_BLOCKS: OutOfBlocksError}


def make_error(status: int, message: str, call: Optional[str] = None) -> ClkvqError:
    cls = _BY_STATUS.get(status, ClkvqError)  # type: ignore[call-overload]
    return cls(status, message, call)


def invalid(message: str, call: Optional[str] = None) -> InvalidArgumentError:
    """The error for a bad argument caught before any C call."""
    return InvalidArgumentError(Status.ERR_INVALID_ARG, message, call)
