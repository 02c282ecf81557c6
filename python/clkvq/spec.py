"""Scheme spec strings: ``SCHEME[:FIELD]...``, the grammar of clkvq-eval.

    fp16   token:k4v4:g32   kivi:k2v2:g32:r128   skvq:k2v1.5:g128:w128:s5:a0.92:fp8
    skvq:k3v2:g32:w128:s5:kc:fp8:center:calib    token:k4v4:rot7:perm

tools/clkvq_eval.c (parse_spec) defines the grammar; this module follows it
field for field, with the same refusals (tests/test_spec.py runs both on
the same strings). Format and scheme names go through the library's own
parsers (clkvq_format_parse, clkvq_scheme_parse).

Each field is one row of FIELDS, tried in order (exact names before
prefixes, ``rot`` before ``r``, ``kc`` before ``k``, as clkvq-eval tries
them). To add a field: a row with its name (or prefix), the schemes it
applies to and a function that sets it on the LayerConfig or the fits.

``calib``, ``perm`` and ``center`` ask for fits on data (clips, channel
permutations, per-channel means; :class:`clkvq.Fit`), which
:func:`clkvq.calibrate_layer` makes and :func:`clkvq.evaluate_dump` makes
per layer, as clkvq-eval does. skvq's group is min(128, head_dim) unless
``gN`` is given (:meth:`Spec.layer_config`).
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from . import _lib
from .errors import invalid
from .types import Axis, Fit, Format, LayerConfig, ParamType, Scheme, ZeroMode

MAX_SPEC = 255  # clkvq_eval.c: char buf[256]
MAX_INT = 1 << 24
MAX_SEED = (1 << 32) - 1

_INT = re.compile(r"[0-9]+\Z")
# what strtod reads whole after cli_starts_number (a digit or '.' and a digit first)
_REAL = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_HEX = re.compile(r"0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)([pP][+-]?[0-9]+)?\Z")


@dataclass
class Spec:
    """A parsed spec: the layer config, what must be fitted on data first
    (``fit``: :class:`clkvq.Fit` flags, 0 for none) and whether the group
    size was given (skvq's default follows the head: min(128, head_dim))."""
    text: str
    config: LayerConfig
    fit: Fit = Fit(0)
    group_given: bool = False

    def layer_config(self, head_dim: Optional[int] = None) -> LayerConfig:
        """The config for a model of head_dim: skvq without ``gN`` groups
        min(128, head_dim) channels, as clkvq-eval does."""
        if head_dim is not None and self.config.scheme == Scheme.SKVQ and not self.group_given:
            return self.config.replace(group_size=min(128, head_dim))
        return self.config


class _State:
    def __init__(self, text: str, lc: LayerConfig):
        self.text, self.lc = text, lc
        self.fit = Fit(0)
        self.center = False
        self.have_clip = False
        self.have_group = False

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


def _real(text: str) -> Optional[float]:
    """strtod's reading of text when it takes all of it and is finite and
    in range (glibc flags underflow to a subnormal as ERANGE), else None."""
    if _REAL.match(text):
        v = float(text)
    elif _HEX.match(text):
        v = float.fromhex(text)
    else:
        return None
    if v != v or v in (float("inf"), float("-inf")) or 0.0 < v < sys.float_info.min:
        return None
    return v


def _clip(st: _State, value: str) -> None:
    a = _real(value)
    if a is None or not 0.0 < a <= 1.0:
        st.fail(f"clip '{value}' must be in (0, 1]")
    st.lc.clip_k = st.lc.clip_v = float(a)  # type: ignore[arg-type]
    st.have_clip = True


def _rot(st: _State, seed: str) -> None:
    if seed and (not _INT.match(seed) or int(seed) > MAX_SEED):
        st.fail(f"rotation seed '{seed}' is not an integer in [0, {MAX_SEED}]")
    st.lc.rotate = True
    st.lc.rot_seed = int(seed) if seed else 0


def _group(st: _State, value: str) -> None:
    st.lc.group_size = _positive(st, value, "group")
    st.have_group = True


def _add_fit(st: _State, fit: Fit) -> None:
    st.fit |= fit


@dataclass
class Field:
    """One field of the grammar: an exact name, or a prefix followed by a
    value."""
    name: str
    prefix: bool
    schemes: Tuple[Scheme, ...]  # where it applies (empty: every quantized scheme)
    apply: Callable[[_State, str, str], None]  # (state, whole field, value after prefix)
    what: str = ""  # the error's word for a field in the wrong scheme


FIELDS: List[Field] = [
    Field("fp8", False, (), lambda st, f, v: setattr(st.lc, "param_type", ParamType.FP8_E4M3)),
    Field("int", False, (), lambda st, f, v: setattr(st.lc, "zero_mode", ZeroMode.INT)),
    Field("calib", False, (), lambda st, f, v: _add_fit(st, Fit.CLIP)),
    Field("perm", False, (), lambda st, f, v: _add_fit(st, Fit.PERM)),
    Field("center", False, (), lambda st, f, v: setattr(st, "center", True)),
    Field("kc", False, (Scheme.SKVQ,),
          lambda st, f, v: setattr(st.lc, "key_axis", Axis.CHANNEL), "kc is an skvq field"),
    Field("rot", True, (), lambda st, f, v: _rot(st, v)),
    Field("k", True, (), lambda st, f, v: _bits(st, f)),
    Field("g", True, (), lambda st, f, v: _group(st, v)),
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
    if st.have_clip and st.fit & Fit.CLIP:
        st.fail("aX fixes the clip, calib fits it: pick one")
    # keys grouped per channel keep their offsets in the zero points
    if st.center:
        channel_keys = scheme == Scheme.KIVI or st.lc.key_axis == Axis.CHANNEL
        st.fit |= Fit.MEAN_V if channel_keys else Fit.MEAN
    return Spec(text, st.lc, st.fit, st.have_group)


def fit_names(fit: Fit) -> str:
    """The spec fields that ask for fit ("calib:perm:center"), "" for none."""
    names = [n for n, f in (("calib", Fit.CLIP), ("perm", Fit.PERM), ("center", Fit.MEAN))
             if fit & f]
    return ":".join(names)


def layer_config(spec, head_dim: Optional[int] = None) -> LayerConfig:
    """A LayerConfig from a spec string, a Spec or a LayerConfig (for a
    model of head_dim: skvq's default group, :meth:`Spec.layer_config`). A
    spec that asks for fits needs data: fit it first with
    :func:`clkvq.calibrate_layer`."""
    if isinstance(spec, LayerConfig):
        return spec
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, Spec):
        if spec.fit:
            raise invalid(f"scheme '{spec.text}': ':{fit_names(spec.fit)}' fits on data; "
                          "fit the LayerConfig first (clkvq.calibrate_layer(ctx, spec, k, v))",
                          "layer_config")
        return spec.layer_config(head_dim)
    raise invalid(f"a layer config is a spec string or LayerConfig, not {type(spec).__name__}",
                  "layer_config")
