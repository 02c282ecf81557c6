"""The enums and plain settings of the C API as Python types.

Enums accept their own members or their names as strings (``"q4"``,
``"kivi"``, ``"group_planar"``). :class:`QuantParams` and
:class:`LayerConfig` are dataclasses that convert to and from the C structs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

import numpy as np

from . import _lib
from ._check import as_float, as_int, float_array, int32_array
from .errors import invalid

E = TypeVar("E", bound="_NamedEnum")


class _NamedEnum(enum.IntEnum):
    """An IntEnum with text names (first is canonical) and aliases."""

    @classmethod
    def _names(cls) -> dict:
        raise NotImplementedError

    @property
    def text(self) -> str:
        return self._names()[self][0]

    def __str__(self) -> str:
        return self.text

    @classmethod
    def coerce(cls: Type[E], value: Any, what: str = "", call: str = "") -> E:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member, names in cls._names().items():
                if key in names:
                    return member
            choices = ", ".join(n[0] for n in cls._names().values())
            raise invalid(f"{what or cls.__name__} '{value}' is not one of {choices}", call)
        raise invalid(f"{what or cls.__name__} must be a {cls.__name__} or its name, "
                      f"not {type(value).__name__}", call)


class Format(_NamedEnum):
    """Packed code formats (clkvq_format)."""
    Q8 = 0
    Q4 = 1
    Q3 = 2
    Q2 = 3
    T15 = 4

    @classmethod
    def _names(cls):
        return {cls.Q8: ("q8", "8"), cls.Q4: ("q4", "4"), cls.Q3: ("q3", "3"),
                cls.Q2: ("q2", "2"), cls.T15: ("t1.5", "1.5")}

    @property
    def bits_name(self) -> str:
        """"8", "4", "3", "2", "1.5" (as configs and specs write it)."""
        return self._names()[self][1]


class Axis(_NamedEnum):
    TOKEN = 0
    CHANNEL = 1

    @classmethod
    def _names(cls):
        return {cls.TOKEN: ("token",), cls.CHANNEL: ("channel",)}


class ParamType(_NamedEnum):
    FP16 = 0
    FP8_E4M3 = 1

    @classmethod
    def _names(cls):
        return {cls.FP16: ("fp16",), cls.FP8_E4M3: ("fp8", "fp8_e4m3")}


class ZeroMode(_NamedEnum):
    FLOAT = 0
    INT = 1

    @classmethod
    def _names(cls):
        return {cls.FLOAT: ("float",), cls.INT: ("int",)}


class Scheme(_NamedEnum):
    FP16 = 0
    TOKEN = 1
    KIVI = 2
    SKVQ = 3

    @classmethod
    def _names(cls):
        return {cls.FP16: ("fp16",), cls.TOKEN: ("token",), cls.KIVI: ("kivi",),
                cls.SKVQ: ("skvq",)}


class Layout(_NamedEnum):
    TOKEN_MAJOR = 0
    GROUP_PLANAR = 1
    AUTO = 100

    @classmethod
    def _names(cls):
        return {cls.TOKEN_MAJOR: ("token_major",), cls.GROUP_PLANAR: ("group_planar",),
                cls.AUTO: ("auto",)}


class AttnVariant(_NamedEnum):
    DEFAULT = 0
    COOPERATIVE = 1
    SERIAL = 2

    @classmethod
    def _names(cls):
        return {cls.DEFAULT: ("default",), cls.COOPERATIVE: ("cooperative",),
                cls.SERIAL: ("serial",)}


class TuningSource(_NamedEnum):
    """Where decode tunables come from (clkvq_tuning_source); the names are
    clkvq_tuning_source_name's."""
    EXACT = 0
    NEAREST = 1
    VENDOR = 2
    BUILTIN = 3
    CALLER = 4

    @classmethod
    def _names(cls):
        return {cls.EXACT: ("exact",), cls.NEAREST: ("nearest",), cls.VENDOR: ("vendor",),
                cls.BUILTIN: ("builtin",), cls.CALLER: ("caller",)}


class Fit(enum.IntFlag):
    """What clkvq_calibrate_layer fits (CLKVQ_FIT_*), or-ed."""
    CLIP_K = 1 << 0
    CLIP_V = 1 << 1
    MEAN_K = 1 << 2
    MEAN_V = 1 << 3
    PERM_K = 1 << 4
    PERM_V = 1 << 5
    CLIP = CLIP_K | CLIP_V
    MEAN = MEAN_K | MEAN_V
    PERM = PERM_K | PERM_V


# ---------------------------------------------------------------- formats


@dataclass(frozen=True)
class FormatInfo:
    """One row of the C format table (clkvq_format_get)."""
    format: Format
    name: str
    bits_name: str
    levels: int
    codes_per_block: int
    bytes_per_block: int
    code_bits: float


def format_info(fmt: Union[Format, str]) -> FormatInfo:
    f = Format.coerce(fmt, "format", "format_info")
    p = _lib.load().clkvq_format_get(int(f))
    if not p:
        raise invalid(f"no format {f}", "format_info")
    c = p.contents
    return FormatInfo(Format(c.format), c.name.decode(), c.bits_name.decode(), c.levels,
                      c.codes_per_block, c.bytes_per_block, c.code_bits)


# ---------------------------------------------------------------- quant params


@dataclass
class QuantParams:
    """clkvq_quant_params; the defaults are clkvq_quant_params_default()'s."""
    format: Format = Format.Q4
    axis: Axis = Axis.TOKEN
    group_size: int = 32
    clip_alpha: float = 1.0
    param_type: ParamType = ParamType.FP16
    zero_mode: ZeroMode = ZeroMode.FLOAT

    def __post_init__(self) -> None:
        call = "QuantParams"
        self.format = Format.coerce(self.format, "format", call)
        self.axis = Axis.coerce(self.axis, "axis", call)
        self.group_size = as_int(self.group_size, "group_size", call)
        self.clip_alpha = as_float(self.clip_alpha, "clip_alpha", call)
        self.param_type = ParamType.coerce(self.param_type, "param_type", call)
        self.zero_mode = ZeroMode.coerce(self.zero_mode, "zero_mode", call)

    def to_c(self) -> _lib.QuantParamsC:
        return _lib.QuantParamsC(int(self.format), int(self.axis), self.group_size,
                                 self.clip_alpha, int(self.param_type), int(self.zero_mode))

    @classmethod
    def from_c(cls, c: _lib.QuantParamsC) -> "QuantParams":
        return cls(Format(c.format), Axis(c.axis), c.group_size, c.clip_alpha,
                   ParamType(c.param_type), ZeroMode(c.zero_mode))


# ---------------------------------------------------------------- layer config


def _array_eq(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


HEAD_FORMATS = ("head_format_k", "head_format_v")


def _head_formats(value: Any, name: str, call: str) -> Optional[Tuple[Format, ...]]:
    """None, or a non-empty sequence of Formats (or their names) as a tuple."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Format)):
        raise invalid(f"{name} must be a sequence of formats, one per kv head, not "
                      f"{type(value).__name__} {value!r}", call)
    try:
        items = list(value)
    except TypeError:
        raise invalid(f"{name} must be a sequence of formats, one per kv head, not "
                      f"{type(value).__name__}", call) from None
    if not items:
        raise invalid(f"{name} is empty: give one format per kv head, or None", call)
    return tuple(Format.coerce(f, f"{name}[{h}]", call) for h, f in enumerate(items))


@dataclass(eq=False)
class LayerConfig:
    """clkvq_layer_config: one layer's scheme and its settings.

    ``LayerConfig.default("skvq")`` gives the library's defaults for a
    scheme and :func:`clkvq.parse_spec` builds one from a spec string.
    perm_k/perm_v are int32 [n_kv_heads, head_dim] (packed position c of
    head h holds input channel perm[h, c]), mean_k/mean_v float32
    [n_kv_heads, head_dim]; the cache copies them at creation.

    head_format_k/head_format_v: per-kv-head bits (KVTuner's per-head
    configs), a tuple of one Format per kv head, or None for
    format_k/format_v on every head (either may be None: that side is then
    format_k/format_v on every head). Heads with different (K, V) pairs
    are stored as one share per pair (include/clkvq.h); a config's
    per-head layer comes back with both tuples and format_k/format_v the
    widest of its heads.
    """
    scheme: Scheme = Scheme.TOKEN
    format_k: Format = Format.Q4
    format_v: Format = Format.Q4
    group_size: int = 32
    clip_k: float = 1.0
    clip_v: float = 1.0
    param_type: ParamType = ParamType.FP16
    zero_mode: ZeroMode = ZeroMode.FLOAT
    window: int = 0
    n_sink: int = 0
    residual: int = 0
    perm_k: Optional[np.ndarray] = None
    perm_v: Optional[np.ndarray] = None
    key_axis: Axis = Axis.TOKEN
    rotate: bool = False
    rot_seed: int = 0
    mean_k: Optional[np.ndarray] = None
    mean_v: Optional[np.ndarray] = None
    head_format_k: Optional[Tuple[Format, ...]] = None
    head_format_v: Optional[Tuple[Format, ...]] = None

    def __post_init__(self) -> None:
        call = "LayerConfig"
        self.scheme = Scheme.coerce(self.scheme, "scheme", call)
        self.format_k = Format.coerce(self.format_k, "format_k", call)
        self.format_v = Format.coerce(self.format_v, "format_v", call)
        self.param_type = ParamType.coerce(self.param_type, "param_type", call)
        self.zero_mode = ZeroMode.coerce(self.zero_mode, "zero_mode", call)
        self.key_axis = Axis.coerce(self.key_axis, "key_axis", call)
        for name in ("group_size", "window", "n_sink", "residual"):
            setattr(self, name, as_int(getattr(self, name), name, call))
        self.rot_seed = as_int(self.rot_seed, "rot_seed", call, 0, (1 << 32) - 1)
        self.clip_k = as_float(self.clip_k, "clip_k", call)
        self.clip_v = as_float(self.clip_v, "clip_v", call)
        self.rotate = bool(self.rotate)
        for name in ("perm_k", "perm_v"):
            p = getattr(self, name)
            if p is not None:
                setattr(self, name, int32_array(np.asarray(p), name, call, (None, None)))
        for name in ("mean_k", "mean_v"):
            m = getattr(self, name)
            if m is not None:
                if not isinstance(m, np.ndarray):
                    m = np.asarray(m, dtype=np.float32)
                setattr(self, name, float_array(m, name, call, (None, None)))
        for name in HEAD_FORMATS:
            setattr(self, name, _head_formats(getattr(self, name), name, call))
        if self.head_format_k is not None and self.head_format_v is not None and \
                len(self.head_format_k) != len(self.head_format_v):
            raise invalid(f"head_format_k has {len(self.head_format_k)} heads, head_format_v "
                          f"{len(self.head_format_v)}: give one format per kv head in each",
                          call)

    @property
    def n_heads(self) -> Optional[int]:
        """The kv heads the head formats are for (None without them)."""
        for f in (self.head_format_k, self.head_format_v):
            if f is not None:
                return len(f)
        return None

    def head_pairs(self, n_kv_heads: int) -> List[Tuple[Format, Format]]:
        """(format_k, format_v) of each of n_kv_heads heads as the cache
        stores them (format_k/format_v where no head format is given)."""
        n = as_int(n_kv_heads, "n_kv_heads", "LayerConfig.head_pairs", 1)
        if self.n_heads is not None and self.n_heads != n:
            raise invalid(f"the layer has head formats for {self.n_heads} kv heads, not {n}",
                          "LayerConfig.head_pairs")
        fk = self.head_format_k or (self.format_k,) * n
        fv = self.head_format_v or (self.format_v,) * n
        return list(zip(fk, fv))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerConfig):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not _array_eq(a, b):
                    return False
            elif f.name in ("clip_k", "clip_v"):
                if np.float32(a) != np.float32(b):  # the C side keeps floats
                    return False
            elif a != b:
                return False
        return True

    @classmethod
    def default(cls, scheme: Union[Scheme, str]) -> "LayerConfig":
        """clkvq_layer_config_default(scheme)."""
        s = Scheme.coerce(scheme, "scheme", "LayerConfig.default")
        return cls.from_c(_lib.load().clkvq_layer_config_default(int(s)))

    def replace(self, **changes: Any) -> "LayerConfig":
        return dataclasses.replace(self, **changes)

    def to_c(self, n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
             call: str = "LayerConfig") -> Tuple[_lib.LayerConfigC, List[Any]]:
        """The C struct and the arrays it points into (keep them alive while
        the struct is used). With n_kv_heads/head_dim, the perm and mean
        arrays are checked against [n_kv_heads, head_dim]; head formats
        need n_kv_heads (the C side reads that many) and must have as many
        entries."""
        keep: List[Any] = []
        c = _lib.LayerConfigC()
        c.scheme, c.format_k, c.format_v = int(self.scheme), int(self.format_k), int(
            self.format_v)
        c.group_size, c.clip_k, c.clip_v = self.group_size, self.clip_k, self.clip_v
        c.param_type, c.zero_mode = int(self.param_type), int(self.zero_mode)
        c.window, c.n_sink, c.residual = self.window, self.n_sink, self.residual
        c.key_axis, c.rotate, c.rot_seed = int(self.key_axis), int(self.rotate), self.rot_seed
        want = (n_kv_heads, head_dim) if n_kv_heads is not None else (None, None)
        for name in ("perm_k", "perm_v"):
            arr = getattr(self, name)
            if arr is not None:
                arr = int32_array(arr, name, call, want, 0,
                                  None if head_dim is None else head_dim - 1)
                keep.append(arr)
                setattr(c, name, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        for name in ("mean_k", "mean_v"):
            arr = getattr(self, name)
            if arr is not None:
                arr = float_array(arr, name, call, want)
                keep.append(arr)
                setattr(c, name, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        for name in HEAD_FORMATS:
            fmts = getattr(self, name)
            if fmts is None:
                continue
            if n_kv_heads is None:
                raise invalid(f"the layer carries {name}: give n_kv_heads", call)
            if len(fmts) != n_kv_heads:
                raise invalid(f"{name} has {len(fmts)} entries; n_kv_heads = {n_kv_heads} "
                              "expected (one format per kv head)", call)
            arr = (_lib.c_enum * len(fmts))(*(int(f) for f in fmts))
            keep.append(arr)
            setattr(c, name, ctypes.cast(arr, ctypes.POINTER(_lib.c_enum)))
        return c, keep

    @classmethod
    def from_c(cls, c: _lib.LayerConfigC, n_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None, n_heads: Optional[int] = None
               ) -> "LayerConfig":
        """Copies a C struct; its perm/mean arrays are copied when their size
        (n_kv_heads x head_dim) is given, and refused when it is not; its
        head formats likewise need their count: n_heads, else n_kv_heads."""
        arrays: Dict[str, Optional[np.ndarray]] = {}
        for name, ct in (("perm_k", np.int32), ("perm_v", np.int32), ("mean_k", np.float32),
                         ("mean_v", np.float32)):
            ptr = getattr(c, name)
            if not ptr:
                arrays[name] = None
                continue
            if n_kv_heads is None or head_dim is None:
                raise invalid(f"the layer carries {name}: give n_kv_heads and head_dim to copy "
                              "it", "LayerConfig.from_c")
            n = n_kv_heads * head_dim
            arrays[name] = np.ctypeslib.as_array(ptr, shape=(n,)).astype(ct).reshape(
                n_kv_heads, head_dim)
        heads: Dict[str, Optional[Tuple[Format, ...]]] = {}
        nh = n_heads if n_heads is not None else n_kv_heads
        for name in HEAD_FORMATS:
            ptr = getattr(c, name)
            if not ptr:
                heads[name] = None
                continue
            if nh is None:
                raise invalid(f"the layer carries {name}: give n_kv_heads to copy it",
                              "LayerConfig.from_c")
            heads[name] = tuple(Format(ptr[h]) for h in range(nh))
        return cls(Scheme(c.scheme), Format(c.format_k), Format(c.format_v), c.group_size,
                   c.clip_k, c.clip_v, ParamType(c.param_type), ZeroMode(c.zero_mode), c.window,
                   c.n_sink, c.residual, arrays["perm_k"], arrays["perm_v"], Axis(c.key_axis),
                   bool(c.rotate), c.rot_seed, arrays["mean_k"], arrays["mean_v"],
                   heads["head_format_k"], heads["head_format_v"])


@dataclass(frozen=True)
class AttnTuning:
    """clkvq_attn_tuning: decode kernel tunables (0: the device's default)."""
    variant: AttnVariant = AttnVariant.DEFAULT
    wgs: int = 0
    chunk: int = 0
    vw: int = 0
    tpl: int = 0
    vwpl: int = 0
    waves: int = 0

    def __post_init__(self) -> None:
        call = "AttnTuning"
        object.__setattr__(self, "variant", AttnVariant.coerce(self.variant, "variant", call))
        for name in ("wgs", "chunk", "vw", "tpl", "vwpl", "waves"):
            object.__setattr__(self, name, as_int(getattr(self, name), name, call))

    def to_c(self) -> _lib.AttnTuningC:
        return _lib.AttnTuningC(int(self.variant), self.wgs, self.chunk, self.vw, self.tpl,
                                self.vwpl, self.waves)

    @classmethod
    def from_c(cls, c: _lib.AttnTuningC) -> "AttnTuning":
        return cls(AttnVariant(c.variant), c.wgs, c.chunk, c.vw, c.tpl, c.vwpl, c.waves)


__all__ = ["Format", "Axis", "ParamType", "ZeroMode", "Scheme", "Layout", "AttnVariant",
           "TuningSource", "Fit", "FormatInfo", "format_info", "QuantParams", "LayerConfig",
           "AttnTuning"]
