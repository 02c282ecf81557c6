"""Scheme spec strings: ``SCHEME[:FIELD]...``, the grammar of clkvq-eval.

    fp16   token:k4v4:g32   kivi:k2v2:g32:r128   skvq:k2v1.5:g128:w128:s5:a0.92:fp8

tools/clkvq_eval.c (parse_spec) defines the grammar; this module follows it
field for field, with the same refusals (tests/test_spec.py runs both on
the same strings). Format and scheme names go through the library's own
parsers (clkvq_format_parse, clkvq_scheme_parse).

Each field is one row of FIELDS, tried in order (exact names before
one-letter prefixes, so ``rot`` is not read as ``r`` + ``ot``). To add a
field: a row with its name (or prefix), the schemes it applies to and a
function that sets it on the LayerConfig.

Rows marked ``ahead=True`` are understood here before clkvq-eval has them
(``rot``: the randomized Hadamard rotation, ``kc``: skvq keys per channel);
keep their spelling in step with tools/clkvq_eval.c when it gains them.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from . import _lib
from .errors import invalid
from .types import Axis, Format, LayerConfig, ParamType, Scheme, ZeroMode

MAX_SPEC = 255  # clkvq_eval.c: char buf[256]
MAX_INT = 1 << 24

_INT = re.compile(r"[0-9]+\Z")
_REAL = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


@dataclass
class Spec:
    """A parsed spec: the layer config, and what must be calibrated on data
    first (``"calib"``: skvq permutation + clip search; ``"perm"``: the
    permutation alone; None)."""
    text: str
    config: LayerConfig
    calibrate: Optional[str] = None


class _State:
    def __init__(self, text: str, lc: LayerConfig):
        self.text, self.lc = text, lc
        self.calibrate: Optional[str] = None
        self.have_clip = False

    def fail(self, why: str) -> None:
        raise invalid(f"scheme '{self.text}': {why}", "parse_spec")


def _positive(st: _State, text: str, what: str) -> int:
    if not _INT.match(text) or not 1 <= int(text) <= MAX_INT:
        st.fail(f"{what} '{text}' is not an integer in [1, {MAX_INT}]")
    return int(text)


def _format(text: str) -> Optional[Format]:
    out = ctypes.c_int()
    if _lib.load().clkvq_format_parse(text.encode(), ctypes.byref(out)) != 0:
        return None
    return Format(out.value)


def _bits(st: _State, field: str) -> None:
    v = field.find("v")
    kbits = field[1:v] if v > 0 else ""
    if v < 0 or not kbits or len(kbits) >= 16:
        st.fail(f"bits field '{field}' is not kBvB (e.g. k4v2)")
    vbits = field[v + 1:]
    fk = None if "q" in kbits else _format(kbits)
    fv = None if "q" in vbits else _format(vbits)
    if fk is None or fv is None:
        st.fail(f"bits in '{field}' must be 8, 4, 3, 2 or 1.5")
        return
    st.lc.format_k, st.lc.format_v = fk, fv


def _fp16_window(st: _State, value: str, what: str) -> int:
    return 0 if value == "0" else _positive(st, value, what)


def _clip(st: _State, value: str) -> None:
    if not _REAL.match(value) or not 0.0 < float(value) <= 1.0:
        st.fail(f"clip '{value}' must be in (0, 1]")
    st.lc.clip_k = st.lc.clip_v = float(value)
    st.have_clip = True


def _set_calib(st: _State, how: str) -> None:
    st.calibrate = how


@dataclass
class Field:
    """One field of the grammar: an exact name, or a one-letter prefix
    followed by a value."""
    name: str
    prefix: bool
    schemes: Tuple[Scheme, ...]  # where it applies (empty: every quantized scheme)
    apply: Callable[[_State, str, str], None]  # (state, whole field, value after prefix)
    what: str = ""  # the error's word for a field in the wrong scheme
    ahead: bool = False  # understood here before clkvq-eval has it


FIELDS: List[Field] = [
    Field("fp8", False, (), lambda st, f, v: setattr(st.lc, "param_type", ParamType.FP8_E4M3)),
    Field("int", False, (), lambda st, f, v: setattr(st.lc, "zero_mode", ZeroMode.INT)),
    Field("calib", False, (Scheme.SKVQ,), lambda st, f, v: _set_calib(st, "calib"),
          "calib is an skvq field"),
    Field("perm", False, (Scheme.SKVQ,), lambda st, f, v: _set_calib(st, "perm"),
          "perm is an skvq field"),
    Field("rot", False, (), lambda st, f, v: setattr(st.lc, "rotate", True), ahead=True),
    Field("kc", False, (Scheme.SKVQ,),
          lambda st, f, v: setattr(st.lc, "key_axis", Axis.CHANNEL), "kc is an skvq field",
          ahead=True),
    Field("k", True, (), lambda st, f, v: _bits(st, f)),
    Field("g", True, (), lambda st, f, v: setattr(st.lc, "group_size",
                                                  _positive(st, v, "group"))),
    Field("r", True, (Scheme.KIVI,), lambda st, f, v: setattr(st.lc, "residual",
                                                              _positive(st, v, "residual")),
          "residual ('r') is a kivi field"),
    Field("w", True, (Scheme.SKVQ,), lambda st, f, v: setattr(st.lc, "window",
                                                              _fp16_window(st, v, "window")),
          "window ('w') is an skvq field"),
    Field("s", True, (Scheme.SKVQ,), lambda st, f, v: setattr(st.lc, "n_sink",
                                                              _fp16_window(st, v, "sinks")),
          "sinks ('s') is an skvq field"),
    Field("a", True, (), lambda st, f, v: _clip(st, v)),
]


def parse_spec(text: str) -> Spec:
    """Parses ``SCHEME[:FIELD]...`` (see the module docstring and
    ``clkvq-eval --help``) into a :class:`Spec`. Raises
    InvalidArgumentError naming the spec and the bad field."""
    if not isinstance(text, str):
        raise invalid(f"a scheme spec is a string, not {type(text).__name__}", "parse_spec")
    if len(text.encode()) > MAX_SPEC:
        raise invalid(f"scheme '{text[:40]}...' is too long", "parse_spec")
    parts = [p for p in text.split(":") if p]  # strtok_r skips empty fields
    head = parts[0] if parts else ""
    out = ctypes.c_int()
    if not head or _lib.load().clkvq_scheme_parse(head.encode(), ctypes.byref(out)) != 0:
        raise invalid(f"scheme '{text}': '{head}' is not fp16, token, kivi or skvq",
                      "parse_spec")
    scheme = Scheme(out.value)
    st = _State(text, LayerConfig.default(scheme))
    for f in parts[1:]:
        if scheme == Scheme.FP16:
            st.fail(f"fp16 takes no fields ('{f}')")
        row = next((r for r in FIELDS if (f.startswith(r.name) if r.prefix else f == r.name)),
                   None)
        if row is None:
            st.fail(f"unknown field '{f}' (see clkvq-eval --help)")
        assert row is not None
        if row.schemes and scheme not in row.schemes:
            st.fail(row.what or f"'{f}' does not apply to {scheme.text}")
        row.apply(st, f, f[len(row.name):] if row.prefix else "")
    if st.have_clip and st.calibrate == "calib":
        st.fail("aX fixes the clip, calib searches it: pick one")
    return Spec(text, st.lc, st.calibrate)


def layer_config(spec) -> LayerConfig:
    """A LayerConfig from a spec string, a Spec or a LayerConfig. A spec
    that asks for calibration needs data; use clkvq.evaluate or calibrate
    first."""
    if isinstance(spec, LayerConfig):
        return spec
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, Spec):
        if spec.calibrate:
            raise invalid(f"scheme '{spec.text}': ':{spec.calibrate}' calibrates on data; "
                          "calibrate the LayerConfig first (clkvq.calibrate_permutation, "
                          "calibrate_clip)", "layer_config")
        return spec.config
    raise invalid(f"a layer config is a spec string or LayerConfig, not {type(spec).__name__}",
                  "layer_config")
