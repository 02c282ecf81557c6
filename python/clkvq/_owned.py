"""The lifetime every owner of a C handle shares (Context, Cache,
PrecisionConfig, Dump): ``handle`` refused once closed, ``closed``, with
blocks, and a close when garbage-collected. Subclasses set ``_NOUN`` and
``_CALL`` (for the error) and implement ``close()``."""

from __future__ import annotations

from typing import Any, Optional, TypeVar

from .errors import ClkvqError, Status

_T = TypeVar("_T", bound="Owned")


class Owned:
    _NOUN = "object"
    _CALL = "Owned"
    _handle: Optional[int] = None

    @property
    def handle(self) -> int:
        """The C handle (raises if closed)."""
        if self._handle is None:
            raise ClkvqError(Status.ERR_INVALID_ARG, f"the {self._NOUN} is closed", self._CALL)
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
