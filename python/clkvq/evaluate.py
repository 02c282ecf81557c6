"""Accuracy of schemes through the library's kernels: one layer
(clkvq_eval_layer), or a whole calibration dump as clkvq-eval reports it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

import ctypes
import numpy as np

from . import _lib
from ._check import as_int, check_status, float_array, fptr
from .cache import Cache
from .config import PrecisionConfig
from .context import Context
from .dump import Dump
from .errors import ClkvqError, invalid
from .quant import calibrate_layer
from .spec import Spec, fit_names, layer_config, parse_spec
from .types import Fit, LayerConfig

DEFAULT_QUERIES = 128  # CLKVQ_DEFAULT_QUERIES


@dataclass(frozen=True)
class EvalResult:
    """clkvq_eval_result."""
    bits_per_element: float
    rel_err: float
    cosine: float
    k_rel_err: float
    v_rel_err: float
    n_queries: int
    err_sq: float = 0.0  # the sums behind rel_err, so that layers pool exactly
    ref_sq: float = 0.0
    bits_long: float = 0.0  # bits per element as the context grows without bound
    k_err_sq: float = 0.0  # and behind k_rel_err, v_rel_err
    k_ref_sq: float = 0.0
    v_err_sq: float = 0.0
    v_ref_sq: float = 0.0


def eval_layer(ctx: Context, config: Union[str, Spec, LayerConfig], q: np.ndarray,
               k: np.ndarray, v: np.ndarray, n_queries: int) -> EvalResult:
    """clkvq_eval_layer: K/V ([n_kv_heads, n_tokens, head_dim]) go into a
    cache; each of the last n_queries queries (q: [n_q_heads, n_tokens,
    head_dim]) is decoded over the cache as it stands and compared with
    fp64 attention over the original K/V."""
    call = "eval_layer"
    lc = layer_config(config)
    q = float_array(q, "q", call, (None, None, None))
    nq, nt, hd = q.shape
    k = float_array(k, "k", call, (None, nt, hd))
    v = float_array(v, "v", call, (k.shape[0], nt, hd))
    c, keep = lc.to_c(k.shape[0], hd, call)
    out = _lib.EvalResultC()
    check_status(_lib.load().clkvq_eval_layer(ctx.handle, ctypes.byref(c), nq, k.shape[0], nt,
                                              hd, fptr(q), fptr(k), fptr(v),
                                              as_int(n_queries, "n_queries", call),
                                              ctypes.byref(out)), ctx.handle, call)
    del keep
    return EvalResult(out.bits_per_element, out.rel_err, out.cosine, out.k_rel_err,
                      out.v_rel_err, out.n_queries, out.err_sq, out.ref_sq, out.bits_long,
                      out.k_err_sq, out.k_ref_sq, out.v_err_sq, out.v_ref_sq)


@dataclass
class LayerScore:
    """One layer of one row: the sums clkvq_eval_result carries, and the
    clips the layer ran with (fitted rows: the fitted ones)."""
    bits: float = 0.0
    bits_long: float = 0.0
    num: float = 0.0
    den: float = 0.0
    cos: float = 0.0
    k_num: float = 0.0
    k_den: float = 0.0
    v_num: float = 0.0
    v_den: float = 0.0
    clip_k: float = 1.0
    clip_v: float = 1.0


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


@dataclass
class SchemeScore:
    """One row of clkvq-eval: errors as sqrt(sum num / sum den) over layers,
    cosine and bits as means. ``fitted``: "-" (nothing fitted),
    "in-sample" (fitted on the evaluated dump) or "out-of-sample"."""
    scheme: str
    fitted: str = "-"
    layers: List[LayerScore] = field(default_factory=list)

    @property
    def in_sample(self) -> bool:
        return self.fitted == "in-sample"

    def _mean(self, name: str) -> float:
        # clkvq-eval adds each layer's share (r / n_layers), in layer order
        n = len(self.layers)
        total = 0.0
        for s in self.layers:
            total += getattr(s, name) / n
        return total

    @property
    def bits_per_element(self) -> float:
        return self._mean("bits")

    @property
    def bits_long(self) -> float:
        return self._mean("bits_long")

    @property
    def cosine(self) -> float:
        return self._mean("cos")

    @property
    def rel_err(self) -> float:
        return _ratio(sum(s.num for s in self.layers), sum(s.den for s in self.layers))

    @property
    def k_rel_err(self) -> float:
        return _ratio(sum(s.k_num for s in self.layers), sum(s.k_den for s in self.layers))

    @property
    def v_rel_err(self) -> float:
        return _ratio(sum(s.v_num for s in self.layers), sum(s.v_den for s in self.layers))

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "bits_per_element": self.bits_per_element,
                "bits_long": self.bits_long, "rel_err": self.rel_err, "cosine": self.cosine,
                "k_rel_err": self.k_rel_err, "v_rel_err": self.v_rel_err,
                "fitted": self.fitted, "in_sample": self.in_sample}


class _Row:
    """A row of the evaluation: a spec (base config and fits) or a config."""

    def __init__(self, name: str, base: Optional[LayerConfig], fit: Fit = Fit(0),
                 config: Optional[PrecisionConfig] = None, spec: Optional[Spec] = None):
        self.name, self.base, self.fit, self.config, self.spec = name, base, fit, config, spec

    def layer(self, ctx: Context, layer: int, n_kv_heads: int, head_dim: int,
              fk: np.ndarray, fv: np.ndarray) -> LayerConfig:
        """clkvq_eval.c's row_layer: a config's layer, or the spec's with
        its rotation seed + layer (as a config's layers get them), fitted
        on (fk, fv) when the row asks."""
        if self.config is not None:
            return self.config.layer(layer, n_kv_heads, head_dim)
        assert self.base is not None
        lc = self.base.replace(rot_seed=(self.base.rot_seed + layer) & 0xFFFFFFFF)
        if not self.fit:
            return lc
        return calibrate_layer(ctx, lc, fk, fv, self.fit)


def _open(ctx: Context, dump: Union[Dump, str, "os.PathLike[str]"],
          owned: List[Dump]) -> Dump:
    if isinstance(dump, Dump):
        return dump
    d = Dump(ctx, dump)
    owned.append(d)
    return d


def evaluate_dump(ctx: Context, dump: Union[Dump, str, "os.PathLike[str]"],
                  schemes: Sequence[Union[str, Spec, LayerConfig]] = (),
                  configs: Sequence[Union[str, "os.PathLike[str]", PrecisionConfig]] = (),
                  config_defaults: Any = None, n_queries: int = DEFAULT_QUERIES,
                  progress: Optional[Any] = None,
                  fit: Union[None, Dump, str, "os.PathLike[str]"] = None) -> List[SchemeScore]:
    """What ``clkvq-eval --calib DUMP --scheme S... --config C...
    [--config-scheme D] [--fit F]`` reports: per scheme (and config) the
    attention-output error of every layer over the dump's last n_queries
    positions, through the library's kernels, number for number.

    Spec rows that fit (``calib``, ``perm``, ``center``) fit per layer with
    :func:`clkvq.calibrate_layer` on the dump itself (in-sample) or, with
    ``fit``, on another dump of the same model (out of sample). Spec and
    LayerConfig rows use rot_seed + layer in layer l, as configs do; skvq
    specs without ``gN`` group min(128, head_dim) channels. Every spec is
    checked against the dump's shape (clkvq_cache_plan) before anything is
    evaluated: a spec the cache refuses raises InvalidArgumentError.
    Configs with per-head bits evaluate too (clkvq_eval_layer stores each
    pair of heads as a share, bits weighted by heads), as in clkvq-eval."""
    call = "evaluate_dump"
    rows: List[_Row] = []
    for s in schemes:
        sp = parse_spec(s) if isinstance(s, str) else s
        if isinstance(sp, Spec):
            rows.append(_Row(sp.text, None, sp.fit, spec=sp))
        elif isinstance(sp, LayerConfig):
            rows.append(_Row(repr(sp), sp))
        else:
            raise invalid(f"a scheme is a spec or LayerConfig, not {type(s).__name__}", call)
    defaults = None
    if config_defaults is not None:
        d = parse_spec(config_defaults) if isinstance(config_defaults, str) else config_defaults
        if isinstance(d, Spec) and d.fit:
            raise invalid(f"config defaults '{d.text}' cannot fit ({fit_names(d.fit)}): a "
                          "config carries its own clips, permutations and means", call)
        defaults = layer_config(d)
    owned: List[Dump] = []
    owned_cfgs: List[PrecisionConfig] = []
    try:
        dump = _open(ctx, dump, owned)
        info = dump.info
        fit_dump = None if fit is None else _open(ctx, fit, owned)
        fit_info = info if fit_dump is None else fit_dump.info
        if (fit_info.n_layers, fit_info.n_kv_heads, fit_info.head_dim) != \
                (info.n_layers, info.n_kv_heads, info.head_dim):
            raise invalid(f"the fit dump has {fit_info.n_layers} layers x {fit_info.n_kv_heads} "
                          f"kv heads x head_dim {fit_info.head_dim}, the dump {info.n_layers} x "
                          f"{info.n_kv_heads} x {info.head_dim}: fit on a dump of the same "
                          "model", call)
        n_queries = as_int(n_queries, "n_queries", call)
        if not 1 <= n_queries <= info.n_tokens:
            raise invalid(f"n_queries {n_queries} is not in [1, {info.n_tokens}]", call)
        for row in rows:
            if row.spec is not None:
                row.base = row.spec.layer_config(info.head_dim)
            assert row.base is not None
            try:
                Cache.plan(ctx, row.base, n_layers=1, capacity=info.n_tokens,
                           n_kv_heads=info.n_kv_heads, n_q_heads=info.n_q_heads,
                           head_dim=info.head_dim)
            except ClkvqError as e:
                raise invalid(f"scheme '{row.name}': {e.message}", call) from None
        for c in configs:
            if not isinstance(c, PrecisionConfig):
                name = os.path.basename(os.fspath(c))
                c = PrecisionConfig.load(c, defaults, ctx)
                owned_cfgs.append(c)
            else:
                name = c.model or "config"
            c.check_model(info.n_layers)
            # per-head layers evaluate through clkvq_eval_layer like any other
            # (one share per pair of heads; bits averaged over the shares)
            rows.append(_Row(name, None, config=c))
        kind = "out-of-sample" if fit_dump is not None else "in-sample"
        scores = [SchemeScore(r.name, kind if r.fit else "-") for r in rows]
        for layer in range(info.n_layers):
            q, k, v = dump.read(layer, "q"), dump.read(layer, "k"), dump.read(layer, "v")
            if fit_dump is not None:
                fk, fv = fit_dump.read(layer, "k"), fit_dump.read(layer, "v")
            else:
                fk, fv = k, v
            for row, score in zip(rows, scores):
                lc = row.layer(ctx, layer, info.n_kv_heads, info.head_dim, fk, fv)
                r = eval_layer(ctx, lc, q, k, v, n_queries)
                score.layers.append(LayerScore(
                    r.bits_per_element, r.bits_long, r.err_sq, r.ref_sq, r.cosine, r.k_err_sq,
                    r.k_ref_sq, r.v_err_sq, r.v_ref_sq, lc.clip_k, lc.clip_v))
                if progress:
                    progress(layer, row.name, r)
        return scores
    finally:
        for c in owned_cfgs:
            c.close()
        for d in owned:
            d.close()
