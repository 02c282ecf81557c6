"""Accuracy of schemes through the library's kernels: one layer
(clkvq_eval_layer), or a whole calibration dump as clkvq-eval reports it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import ctypes
import numpy as np

from . import _lib
from ._check import as_int, check_status, float_array, fptr
from .config import PrecisionConfig
from .context import Context
from .dump import Dump
from .errors import invalid
from .quant import calibrate_clip, calibrate_permutation
from .spec import Spec, layer_config, parse_spec
from .types import Axis, LayerConfig, QuantParams

# clkvq_eval.c: the clip grid of ':calib' rows
CLIP_LO, CLIP_HI, CLIP_STEP = 0.80, 1.00, 0.01


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
                      out.v_rel_err, out.n_queries, out.err_sq, out.ref_sq, out.bits_long)


def reference_sq_norm(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_queries: int) -> float:
    """Sum over q heads and the last n_queries positions of |o_ref|^2 (fp64
    causal attention over the original K/V): the denominator of rel_err."""
    nq, nt, hd = q.shape
    group = nq // k.shape[0]
    scale = float(np.float32(1.0 / math.sqrt(hd)))
    p0 = nt - n_queries
    mask = np.arange(nt)[None, :] > np.arange(p0, nt)[:, None]
    total = 0.0
    for h in range(nq):
        kb = k[h // group].astype(np.float64)
        vb = v[h // group].astype(np.float64)
        s = (q[h, p0:].astype(np.float64) @ kb.T) * scale
        s[mask] = -np.inf
        s = np.exp(s - s.max(axis=1, keepdims=True))
        o = (s / s.sum(axis=1, keepdims=True)) @ vb
        total += float((o * o).sum())
    return total


@dataclass
class LayerScore:
    bits: float = 0.0
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
    cosine and bits as means."""
    scheme: str
    in_sample: bool
    layers: List[LayerScore] = field(default_factory=list)

    @property
    def bits_per_element(self) -> float:
        return sum(s.bits for s in self.layers) / len(self.layers)

    @property
    def cosine(self) -> float:
        return sum(s.cos for s in self.layers) / len(self.layers)

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
                "rel_err": self.rel_err, "cosine": self.cosine, "k_rel_err": self.k_rel_err,
                "v_rel_err": self.v_rel_err, "in_sample": self.in_sample}


def _calibrate(ctx: Context, lc: LayerConfig, is_v: bool, x: np.ndarray, search_clip: bool):
    """clkvq_eval.c's calibrate_tensor: on the tokens that are ever quantized
    (the sinks stay fp16)."""
    n_tokens = x.shape[1]
    n_sink = lc.n_sink if lc.n_sink < n_tokens - 1 else 0
    data = np.ascontiguousarray(x[:, n_sink:, :])
    perm = calibrate_permutation(ctx, data, lc.group_size)
    clip = lc.clip_v if is_v else lc.clip_k
    if search_clip:
        qp = QuantParams(lc.format_v if is_v else lc.format_k, Axis.TOKEN, lc.group_size, 1.0,
                         lc.param_type, lc.zero_mode)
        clip, _ = calibrate_clip(ctx, data, qp, perm, CLIP_LO, CLIP_HI, CLIP_STEP)
    return perm, clip


def evaluate_dump(ctx: Context, dump: Union[Dump, str, "os.PathLike[str]"],
                  schemes: Sequence[Union[str, Spec, LayerConfig]] = (),
                  configs: Sequence[Union[str, "os.PathLike[str]", PrecisionConfig]] = (),
                  config_defaults: Any = None, n_queries: int = 128,
                  progress: Optional[Any] = None) -> List[SchemeScore]:
    """What ``clkvq-eval --calib DUMP --scheme S... --config C...`` reports:
    per scheme (and config) the attention-output error of every layer over
    the dump's last n_queries positions, through the library's kernels.
    ':calib' / ':perm' specs calibrate on the dump itself (in-sample)."""
    call = "evaluate_dump"
    owned = None
    if not isinstance(dump, Dump):
        dump = owned = Dump(ctx, dump)
    try:
        info = dump.info
        if not 1 <= n_queries <= info.n_tokens:
            raise invalid(f"n_queries {n_queries} is not in [1, {info.n_tokens}]", call)
        # (name, base LayerConfig or None, calibrate, PrecisionConfig or None)
        rows: List[Tuple[str, Optional[LayerConfig], Optional[str],
                         Optional[PrecisionConfig]]] = []
        for s in schemes:
            sp = parse_spec(s) if isinstance(s, str) else s
            if isinstance(sp, Spec):
                rows.append((sp.text, sp.config, sp.calibrate, None))
            elif isinstance(sp, LayerConfig):
                rows.append((repr(sp), sp, None, None))
            else:
                raise invalid(f"a scheme is a spec or LayerConfig, not {type(s).__name__}", call)
        cfgs_owned = []
        for c in configs:
            if not isinstance(c, PrecisionConfig):
                name = os.path.basename(os.fspath(c))
                c = PrecisionConfig.load(c, config_defaults, ctx)
                cfgs_owned.append(c)
            else:
                name = c.model or "config"
            c.check_model(info.n_layers)
            rows.append((name, None, None, c))
        scores = [SchemeScore(r[0], bool(r[2])) for r in rows]
        for layer in range(info.n_layers):
            q, k, v = dump.read(layer, "q"), dump.read(layer, "k"), dump.read(layer, "v")
            out_den = reference_sq_norm(q, k, v, n_queries)
            k_den = float((k.astype(np.float64) ** 2).sum())
            v_den = float((v.astype(np.float64) ** 2).sum())
            for (name, base, calib, cfg), score in zip(rows, scores):
                lc = cfg.layer(layer, info.n_kv_heads, info.head_dim) if cfg else base
                assert lc is not None
                if calib:
                    pk, ck = _calibrate(ctx, lc, False, k, calib == "calib")
                    pv, cv = _calibrate(ctx, lc, True, v, calib == "calib")
                    lc = lc.replace(perm_k=pk, perm_v=pv, clip_k=ck, clip_v=cv)
                r = eval_layer(ctx, lc, q, k, v, n_queries)
                score.layers.append(LayerScore(
                    r.bits_per_element, r.rel_err ** 2 * out_den, out_den, r.cosine,
                    r.k_rel_err ** 2 * k_den, k_den, r.v_rel_err ** 2 * v_den, v_den,
                    lc.clip_k, lc.clip_v))
                if progress:
                    progress(layer, name, r)
        for c in cfgs_owned:
            c.close()
        return scores
    finally:
        if owned is not None:
            owned.close()
