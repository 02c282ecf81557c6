"""Layer precision configs (KVTuner YAML files): load, parse, build, save."""

from __future__ import annotations

import ctypes
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

from . import _lib
from ._check import as_int, check_status
from .context import Context
from ._owned import Owned
from .errors import invalid
from .models import ModelGeometry, model_geometry
from .spec import layer_config
from .tuning import TuneShape
from .types import Format, LayerConfig

PATH_MAX = 4096 + 256  # room for <cache dir>/configs/<model>.yaml

PathLike = Union[str, "os.PathLike[str]"]


def _ctx_handle(ctx: Optional[Context]) -> Optional[int]:
    """Configs only borrow a context for its error messages: none once it is closed."""
    return None if ctx is None or ctx.closed else ctx.handle


def _defaults(defaults: Any, call: str) -> Tuple[Optional[_lib.LayerConfigC], List[Any]]:
    if defaults is None:
        return None, []
    lc = layer_config(defaults)
    if lc.n_heads is not None:
        # the loader would drop them: a file's layers have their own head count
        raise invalid("defaults cannot carry head formats (head_format_k/head_format_v): "
                      "per-head bits go in the file's layers", call)
    return lc.to_c(call=call)


class PrecisionConfig(Owned):
    """clkvq_precision_config: per layer (and optionally per kv head) the key
    and value formats plus the scheme settings. Load one with
    :meth:`load` / :meth:`parse`, build one with :meth:`create`.

    ``defaults`` (a spec string or LayerConfig; None: the token scheme's)
    give every field the file leaves out, e.g. the scheme a KVTuner preset
    was searched for.
    """

    _NOUN = "config"
    _CALL = "PrecisionConfig"

    def __init__(self, handle: int, ctx: Optional[Context], dims: Tuple[Optional[int],
                                                                        Optional[int]]):
        self._handle: Optional[int] = handle
        self._ctx = ctx
        self._lib = _lib.load()
        self.n_kv_heads, self.head_dim = dims
        self.origin: Optional[str] = None  # for_model: the stored file or "shipped:<preset>"

    @classmethod
    def load(cls, path: PathLike, defaults: Any = None, ctx: Optional[Context] = None,
             n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None
             ) -> "PrecisionConfig":
        """clkvq_config_load. n_kv_heads/head_dim: the shape its permutations
        have (needed only to read them back with :meth:`layer`)."""
        lib = _lib.load()
        d, keep = _defaults(defaults, "PrecisionConfig.load")
        out = ctypes.c_void_p()
        h = _ctx_handle(ctx)
        check_status(lib.clkvq_config_load(h, os.fsencode(path),
                                           ctypes.byref(d) if d is not None else None,
                                           ctypes.byref(out)), h, "PrecisionConfig.load")
        del keep
        return cls(out.value, ctx, (n_kv_heads, head_dim))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: Union[str, bytes], defaults: Any = None, ctx: Optional[Context] = None,
              n_kv_heads: Optional[int] = None, head_dim: Optional[int] = None
              ) -> "PrecisionConfig":
        """clkvq_config_parse: YAML text in memory."""
        lib = _lib.load()
        data = text.encode() if isinstance(text, str) else bytes(text)
        d, keep = _defaults(defaults, "PrecisionConfig.parse")
        out = ctypes.c_void_p()
        h = _ctx_handle(ctx)
        check_status(lib.clkvq_config_parse(h, data, len(data),
                                            ctypes.byref(d) if d is not None else None,
                                            ctypes.byref(out)), h, "PrecisionConfig.parse")
        del keep
        return cls(out.value, ctx, (n_kv_heads, head_dim))  # type: ignore[arg-type]

    @classmethod
    def load_for_model(cls, path: PathLike, defaults: Any = None,
                       geometry: Union[None, str, ModelGeometry] = None,
                       ctx: Optional[Context] = None) -> "PrecisionConfig":
        """clkvq_config_load_for_model: a config file to run on one model.
        Geometry: ``geometry`` (a ModelGeometry, a model name or
        "q32:kv8:d128:l32"), else the file's own, its ``model`` field's, or
        the model a KVTuner preset's file name names; it is checked and
        recorded. KVTuner presets load with the settings they were searched
        under unless defaults are given."""
        call = "PrecisionConfig.load_for_model"
        g = None if geometry is None else model_geometry(geometry).to_c()
        d, keep = _defaults(defaults, call)
        out = ctypes.c_void_p()
        h = _ctx_handle(ctx)
        check_status(_lib.load().clkvq_config_load_for_model(
            h, os.fsencode(path), ctypes.byref(d) if d is not None else None,
            ctypes.byref(g) if g is not None else None, ctypes.byref(out)), h, call)
        del keep
        return cls(out.value, ctx, (None, None))  # type: ignore[arg-type]

    @classmethod
    def for_model(cls, model: str, ctx: Optional[Context] = None) -> "PrecisionConfig":
        """clkvq_config_for_model: the config stored for model (:meth:`store`),
        else the shipped KVTuner preset that is its default; ``origin`` says
        which (the stored file's path or "shipped:<preset file>"). An
        unknown model with nothing stored raises InvalidArgumentError listing
        the known models; a known one with nothing stored or shipped,
        ClkvqError CLKVQ_ERR_IO."""
        call = "PrecisionConfig.for_model"
        if not isinstance(model, str) or not model:
            raise invalid(f"model must be a non-empty string, not {model!r}", call)
        out = ctypes.c_void_p()
        origin = ctypes.create_string_buffer(PATH_MAX)
        h = _ctx_handle(ctx)
        check_status(_lib.load().clkvq_config_for_model(h, model.encode(), ctypes.byref(out),
                                                        origin, len(origin)), h, call)
        c = cls(out.value, ctx, (None, None))  # type: ignore[arg-type]
        c.origin = origin.value.decode("utf-8", "replace")
        return c

    @classmethod
    def create(cls, layers: Sequence[Any], model: Optional[str] = None,
               n_kv_heads: int = 0, head_dim: int = 0,
               ctx: Optional[Context] = None) -> "PrecisionConfig":
        """clkvq_config_create from per-layer configs (spec strings or
        LayerConfigs). n_kv_heads/head_dim matter only when layers carry
        permutations or means (both) or head formats (n_kv_heads: their
        length)."""
        call = "PrecisionConfig.create"
        lib = _lib.load()
        lcs = [layer_config(x) for x in layers]
        if not lcs:
            raise invalid("no layers", call)
        nk = as_int(n_kv_heads, "n_kv_heads", call, 0)
        hd = as_int(head_dim, "head_dim", call, 0)
        arr = (_lib.LayerConfigC * len(lcs))()
        keep: List[Any] = []
        for i, lc in enumerate(lcs):
            has = any(a is not None for a in (lc.perm_k, lc.perm_v, lc.mean_k, lc.mean_v))
            if has and (nk <= 0 or hd <= 0):
                raise invalid(f"layer {i} carries permutations: give n_kv_heads and head_dim",
                              call)
            heads = lc.n_heads is not None
            if heads and nk <= 0:
                raise invalid(f"layer {i} carries head formats: give n_kv_heads", call)
            c, k = lc.to_c(nk if has or heads else None, hd if has else None,
                           f"{call}: layer {i}")
            arr[i] = c
            keep.append(k)
        out = ctypes.c_void_p()
        h = _ctx_handle(ctx)
        check_status(lib.clkvq_config_create(h, model.encode() if model else None, len(lcs),
                                             arr, nk, hd, ctypes.byref(out)), h, call)
        return cls(out.value, ctx,  # type: ignore[arg-type]
                   (nk or None, hd or None))

    # ---- lifetime

    def close(self) -> None:
        if self._handle is not None:
            self._lib.clkvq_config_free(self._handle)
            self._handle = None

    # ---- contents

    def save(self, path: PathLike) -> None:
        """clkvq_config_save (atomic); load(save(c)) == c."""
        h = _ctx_handle(self._ctx)
        check_status(self._lib.clkvq_config_save(h, self.handle, os.fsencode(path)), h,
                     "PrecisionConfig.save")

    @property
    def n_layers(self) -> int:
        return int(self._lib.clkvq_config_n_layers(self.handle))

    def __len__(self) -> int:
        return self.n_layers

    @property
    def model(self) -> str:
        m = self._lib.clkvq_config_model(self.handle)
        return m.decode("utf-8", "replace") if m else ""

    def layer(self, layer: int, n_kv_heads: Optional[int] = None,
              head_dim: Optional[int] = None) -> LayerConfig:
        """Layer l's settings; its permutations are copied out when the
        config's shape is known (from create, its recorded geometry, or
        given here or at load). A per-head layer comes with head_format_k
        and head_format_v (one Format per kv head) and format_k/format_v
        the widest of its heads."""
        call = "PrecisionConfig.layer"
        layer = as_int(layer, "layer", call)
        c = _lib.LayerConfigC()
        check_status(self._lib.clkvq_config_layer(self.handle, layer, ctypes.byref(c)), None,
                     call)
        g = self.geometry
        nk = n_kv_heads or self.n_kv_heads or (g.n_kv_heads if g else None)
        hd = head_dim or self.head_dim or (g.head_dim if g else None)
        # the config knows its per-head layers' head counts itself
        return LayerConfig.from_c(c, nk, hd, self.n_heads(layer) or None)

    def layers(self, n_kv_heads: Optional[int] = None,
               head_dim: Optional[int] = None) -> List[LayerConfig]:
        return [self.layer(i, n_kv_heads, head_dim) for i in range(self.n_layers)]

    def n_heads(self, layer: int) -> int:
        """Heads with their own bits in the layer (0: one pair for the layer)."""
        return int(self._lib.clkvq_config_n_heads(self.handle,
                                                  as_int(layer, "layer", "n_heads")))

    def head(self, layer: int, head: int) -> Tuple[Format, Format]:
        """(format_k, format_v) of one head of a per-head layer."""
        call = "PrecisionConfig.head"
        fk, fv = ctypes.c_int(), ctypes.c_int()
        check_status(self._lib.clkvq_config_head(self.handle, as_int(layer, "layer", call),
                                                 as_int(head, "head", call), ctypes.byref(fk),
                                                 ctypes.byref(fv)), None, call)
        return Format(fk.value), Format(fv.value)

    @property
    def average_bits(self) -> float:
        """KVTuner's average: mean over layers of (bits_k + bits_v) / 2."""
        return float(self._lib.clkvq_config_average_bits(self.handle))

    def check_model(self, n_layers: int) -> None:
        """Raises unless the config has exactly n_layers layers."""
        h = _ctx_handle(self._ctx)
        check_status(self._lib.clkvq_config_check_model(
            h, self.handle, as_int(n_layers, "n_layers", "check_model")), h, "check_model")

    # ---- geometry and per-model storage

    @property
    def geometry(self) -> Optional[ModelGeometry]:
        """The model geometry the config carries (its file's, or recorded by
        :meth:`set_geometry` / :meth:`load_for_model`), else None."""
        g = _lib.ModelGeometryC()
        if not self._lib.clkvq_config_geometry(self.handle, ctypes.byref(g)):
            return None
        return ModelGeometry.from_c(g)

    def check_geometry(self, geometry: Union[str, ModelGeometry]) -> None:
        """clkvq_config_check_geometry: raises InvalidArgumentError naming the
        first mismatch unless the config fits a model of that geometry (a
        ModelGeometry, a model name or "q32:kv8:d128:l32")."""
        call = "PrecisionConfig.check_geometry"
        g = model_geometry(geometry).to_c()
        h = _ctx_handle(self._ctx)
        check_status(self._lib.clkvq_config_check_geometry(h, self.handle, ctypes.byref(g)), h,
                     call)

    def set_geometry(self, geometry: Union[str, ModelGeometry]) -> None:
        """Checks (as :meth:`check_geometry`), then records the geometry:
        saved and stored with the config from now on."""
        call = "PrecisionConfig.set_geometry"
        g = model_geometry(geometry).to_c()
        h = _ctx_handle(self._ctx)
        check_status(self._lib.clkvq_config_set_geometry(h, self.handle, ctypes.byref(g)), h,
                     call)

    def tune_shapes(self, geometry: Union[None, str, ModelGeometry] = None, tokens: int = 4096,
                    batch: int = 1) -> Tuple[List[TuneShape], List[List[int]], List[int]]:
        """clkvq_config_tune_shapes: the distinct decode shapes a cache of
        ``tokens`` capacity and ``batch`` sequences made from this config
        looks up (one per distinct scheme, formats, group and kv head
        count), ``head_shape`` and ``first_layer``.

        A per-head layer whose heads carry different (K, V) pairs has one
        shape per share of its heads: that pair on the share's head count
        (n_kv_heads, and n_q_heads in proportion). ``head_shape[l][h]`` is
        the index of the shape kv head h of layer l decodes with (a layer
        of one pair: the same index on every head); ``first_layer[i]`` the
        first layer using shape i. geometry: the config's own when None."""
        call = "PrecisionConfig.tune_shapes"
        geo = self.geometry if geometry is None else model_geometry(geometry)
        if geo is None:
            raise invalid("the config carries no geometry: give one", call)
        t, b = as_int(tokens, "tokens", call, 1), as_int(batch, "batch", call, 1)
        self.check_geometry(geo)  # before sizing the arrays by it
        g = geo.to_c()
        n_layers, n_heads = self.n_layers, geo.n_kv_heads
        head_shape = (ctypes.c_int * max(n_layers * n_heads, 1))()
        n = ctypes.c_int()
        h = _ctx_handle(self._ctx)
        cap = max(n_layers * n_heads, 1)  # at most one shape per layer and kv head
        shapes = (_lib.TuneShapeC * cap)()
        first = (ctypes.c_int * cap)()
        check_status(self._lib.clkvq_config_tune_shapes(h, self.handle, ctypes.byref(g), t, b,
                                                        shapes, cap, ctypes.byref(n),
                                                        head_shape, first), h, call)
        per_layer = [list(head_shape[l * n_heads:(l + 1) * n_heads]) for l in range(n_layers)]
        return ([TuneShape.from_c(shapes[i]) for i in range(n.value)], per_layer,
                list(first[:n.value]))

    def store(self, model: Optional[str] = None) -> str:
        """clkvq_config_store: stores the config as model's (None: the
        config's own model), <cache dir>/configs/<model>.yaml, where
        :meth:`for_model` and :meth:`Cache.for_model` find it. The config
        must carry its geometry or name a model of the table. Returns the
        path."""
        call = "PrecisionConfig.store"
        if model is not None and (not isinstance(model, str) or not model):
            raise invalid(f"model must be a non-empty string or None, not {model!r}", call)
        path = ctypes.create_string_buffer(PATH_MAX)
        h = _ctx_handle(self._ctx)
        check_status(self._lib.clkvq_config_store(h, self.handle,
                                                  model.encode() if model else None, path,
                                                  len(path)), h, call)
        return os.fsdecode(path.value)

    def __repr__(self) -> str:
        if self._handle is None:
            return "<clkvq.PrecisionConfig closed>"
        return (f"<clkvq.PrecisionConfig {self.model or '(no model)'}: {self.n_layers} layers, "
                f"{self.average_bits:.3f} average bits>")


def config_show(ctx: Context) -> str:
    """clkvq_config_show: the stored configs (their layer settings, the
    layers using each, where each is tuned on ctx's device), then the
    shipped default per model, as text."""
    if not isinstance(ctx, Context):
        raise invalid(f"ctx must be a clkvq.Context, not {type(ctx).__name__}", "config_show")
    lib = _lib.load()
    status, text = _lib.capture_file_output(lambda f: lib.clkvq_config_show(ctx.handle, f))
    check_status(status, ctx.handle, "config_show")
    return text
