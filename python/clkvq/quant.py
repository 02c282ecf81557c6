"""Quantize / dequantize, packed layouts, calibration and synthetic K/V."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib
from ._check import as_float, as_int, check_status, float_array, fptr, int32_array, iptr
from .context import Context
from .errors import invalid
from .spec import Spec, parse_spec
from .types import Fit, LayerConfig, QuantParams


def _shape3(x_shape, call: str) -> _lib.ShapeC:
    if len(x_shape) != 3:
        raise invalid(f"expected [n_heads, n_tokens, head_dim], got shape {list(x_shape)}", call)
    return _lib.ShapeC(*(as_int(s, "shape", call, 0) for s in x_shape))


def _params(qp: Optional[QuantParams], call: str) -> QuantParams:
    if qp is None:
        return QuantParams()
    if not isinstance(qp, QuantParams):
        raise invalid(f"params must be a QuantParams, not {type(qp).__name__}", call)
    return qp


@dataclass(frozen=True)
class QuantLayout:
    """clkvq_quant_layout: packed sizes for one shape."""
    group_bytes: int
    param_bytes: int
    n_groups: int
    code_bytes: int
    params_bytes: int
    bits_per_element: float


def quant_layout(params: Optional[QuantParams], shape: Tuple[int, int, int]) -> QuantLayout:
    """Sizes of the packed codes and parameters of a [n_heads, n_tokens, head_dim] tensor."""
    qp = _params(params, "quant_layout")
    c_qp, c_shape, out = qp.to_c(), _shape3(shape, "quant_layout"), _lib.QuantLayoutC()
    check_status(_lib.load().clkvq_quant_layout_get(ctypes.byref(c_qp), ctypes.byref(c_shape),
                                                    ctypes.byref(out)), None, "quant_layout")
    return QuantLayout(out.group_bytes, out.param_bytes, out.n_groups, out.code_bytes,
                       out.params_bytes, out.bits_per_element)


def validate_params(params: QuantParams, shape: Tuple[int, int, int],
                    ctx: Optional[Context] = None) -> None:
    """clkvq_quant_params_validate: raises if params do not fit the shape."""
    qp = _params(params, "validate_params")
    c_qp, c_shape = qp.to_c(), _shape3(shape, "validate_params")
    h = ctx.handle if ctx is not None else None
    check_status(_lib.load().clkvq_quant_params_validate(h, ctypes.byref(c_qp),
                                                         ctypes.byref(c_shape)),
                 h, "validate_params")


@dataclass
class Quantized:
    """Packed codes and (scale, zero) parameters of one tensor, with what
    they were made with; :func:`dequantize` turns them back."""
    codes: np.ndarray   # uint8 [code_bytes]
    params: np.ndarray  # uint8 [params_bytes]
    shape: Tuple[int, int, int]
    quant_params: QuantParams
    perm: Optional[np.ndarray] = None  # int32 [n_heads, head_dim]


def _perm(perm, shape, call: str) -> Optional[np.ndarray]:
    if perm is None:
        return None
    return int32_array(perm, "perm", call, (shape[0], shape[2]), 0, shape[2] - 1)


def quantize(ctx: Context, x: np.ndarray, params: Optional[QuantParams] = None,
             perm: Optional[np.ndarray] = None) -> Quantized:
    """Quantizes x (float32/float16 [n_heads, n_tokens, head_dim]) on the
    device (clkvq_quantize_host). perm (int32 [n_heads, head_dim]) gathers
    channels first: output channel c of head h is input channel perm[h, c]."""
    call = "quantize"
    qp = _params(params, call)
    x = float_array(x, "x", call, (None, None, None))
    shape = tuple(int(s) for s in x.shape)
    p = _perm(perm, shape, call)
    lay = quant_layout(qp, shape)  # type: ignore[arg-type]
    codes = np.zeros(lay.code_bytes, dtype=np.uint8)
    prm = np.zeros(lay.params_bytes, dtype=np.uint8)
    c_qp, c_shape = qp.to_c(), _shape3(shape, call)
    check_status(_lib.load().clkvq_quantize_host(
        ctx.handle, ctypes.byref(c_qp), ctypes.byref(c_shape), fptr(x), iptr(p),
        codes.ctypes.data, codes.nbytes, prm.ctypes.data, prm.nbytes), ctx.handle, call)
    return Quantized(codes, prm, shape, qp, None if p is None else p.copy())  # type: ignore


def dequantize(ctx: Context, q: Quantized, unpermute: bool = True) -> np.ndarray:
    """float32 [n_heads, n_tokens, head_dim] from a :class:`Quantized`. With
    a permutation and unpermute (default), channels come back in their
    original order; else they stay in packed order."""
    call = "dequantize"
    if not isinstance(q, Quantized):
        raise invalid(f"expected a Quantized, not {type(q).__name__}", call)
    lay = quant_layout(q.quant_params, q.shape)
    if q.codes.dtype != np.uint8 or q.codes.nbytes != lay.code_bytes or \
            not q.codes.flags["C_CONTIGUOUS"]:
        raise invalid(f"codes must be {lay.code_bytes} contiguous uint8", call)
    if q.params.dtype != np.uint8 or q.params.nbytes != lay.params_bytes or \
            not q.params.flags["C_CONTIGUOUS"]:
        raise invalid(f"params must be {lay.params_bytes} contiguous uint8", call)
    p = _perm(q.perm, q.shape, call) if unpermute else None
    out = np.empty(q.shape, dtype=np.float32)
    c_qp, c_shape = q.quant_params.to_c(), _shape3(q.shape, call)
    check_status(_lib.load().clkvq_dequantize_host(
        ctx.handle, ctypes.byref(c_qp), ctypes.byref(c_shape), q.codes.ctypes.data,
        q.params.ctypes.data, iptr(p), fptr(out)), ctx.handle, call)
    return out


def calibrate_permutation(ctx: Context, x: np.ndarray, group_size: int) -> np.ndarray:
    """Channel permutation per head (int32 [n_heads, head_dim]) from
    calibration data x [n_heads, n_tokens, head_dim]: channels sorted by range."""
    call = "calibrate_permutation"
    x = float_array(x, "x", call, (None, None, None))
    out = np.empty((x.shape[0], x.shape[2]), dtype=np.int32)
    c_shape = _shape3(x.shape, call)
    check_status(_lib.load().clkvq_calibrate_permutation(
        ctx.handle, ctypes.byref(c_shape), fptr(x), as_int(group_size, "group_size", call),
        iptr(out)), ctx.handle, call)
    return out


def calibrate_clip(ctx: Context, x: np.ndarray, params: QuantParams,
                   perm: Optional[np.ndarray] = None, lo: float = 0.8, hi: float = 1.0,
                   step: float = 0.01) -> Tuple[float, float]:
    """Grid search of the clip ratio in [lo, hi] minimizing the mean squared
    reconstruction error of x under params (and perm): (best alpha, its MSE)."""
    call = "calibrate_clip"
    qp = _params(params, call)
    x = float_array(x, "x", call, (None, None, None))
    p = _perm(perm, x.shape, call)
    c_qp, c_shape = qp.to_c(), _shape3(x.shape, call)
    alpha, mse = ctypes.c_float(), ctypes.c_double()
    check_status(_lib.load().clkvq_calibrate_clip(
        ctx.handle, ctypes.byref(c_qp), ctypes.byref(c_shape), fptr(x), iptr(p),
        as_float(lo, "lo", call), as_float(hi, "hi", call), as_float(step, "step", call),
        ctypes.byref(alpha), ctypes.byref(mse)), ctx.handle, call)
    return float(alpha.value), float(mse.value)


def calibrate_layer(ctx: Context, config: Union[str, Spec, LayerConfig], k: np.ndarray,
                    v: np.ndarray, fit: Any = None,
                    clip_grid: Optional[Sequence[float]] = None) -> LayerConfig:
    """clkvq_calibrate_layer: fits a layer config on calibration K/V
    ([n_kv_heads, n_tokens, head_dim], e.g. a dump's layer) and returns it
    with the fitted fields replaced: per-channel means, then on the centered
    (and, with rotate, rotated) rows the channel permutation, then each clip
    under it with the layer's own format, axis and group.

    config: a spec (its ``calib``/``perm``/``center`` fields say what to fit
    unless ``fit`` is given; skvq without ``gN`` groups min(128, head_dim))
    or a LayerConfig (then give ``fit``: :class:`clkvq.Fit` flags).
    clip_grid: (lo, hi, step), None for the library's 0.40 .. 1.00 step 0.02.
    """
    call = "calibrate_layer"
    if not isinstance(ctx, Context):
        raise invalid(f"ctx must be a clkvq.Context, not {type(ctx).__name__}", call)
    k = float_array(k, "k", call, (None, None, None))
    nkv, nt, hd = k.shape
    v = float_array(v, "v", call, (nkv, nt, hd))
    if isinstance(config, str):
        config = parse_spec(config)
    if isinstance(config, Spec):
        base = config.layer_config(hd)
        flags = config.fit if fit is None else fit
    elif isinstance(config, LayerConfig):
        if fit is None:
            raise invalid("give fit (clkvq.Fit flags) with a LayerConfig", call)
        base, flags = config, fit
    else:
        raise invalid(f"config must be a spec or LayerConfig, not {type(config).__name__}",
                      call)
    flags = Fit(as_int(flags, "fit", call, 0, int(Fit.CLIP | Fit.MEAN | Fit.PERM)))
    if clip_grid is None:
        grid = (0.0, 0.0, 0.0)
    else:
        try:
            lo, hi, step = clip_grid
        except (TypeError, ValueError):
            raise invalid("clip_grid is (lo, hi, step)", call) from None
        grid = (as_float(lo, "clip lo", call), as_float(hi, "clip hi", call),
                as_float(step, "clip step", call))
    store = {name: (np.empty((nkv, hd), dtype) if flags & f else None)
             for name, f, dtype in (("mean_k", Fit.MEAN_K, np.float32),
                                    ("mean_v", Fit.MEAN_V, np.float32),
                                    ("perm_k", Fit.PERM_K, np.int32),
                                    ("perm_v", Fit.PERM_V, np.int32))}
    opt = _lib.CalibOptionsC(int(flags), *grid, fptr(store["mean_k"]), fptr(store["mean_v"]),
                             iptr(store["perm_k"]), iptr(store["perm_v"]))
    c_in, keep = base.to_c(nkv, hd, call)
    out = _lib.LayerConfigC()
    check_status(_lib.load().clkvq_calibrate_layer(ctx.handle, ctypes.byref(c_in), nkv, nt, hd,
                                                   fptr(k), fptr(v), ctypes.byref(opt),
                                                   ctypes.byref(out)), ctx.handle, call)
    result = LayerConfig.from_c(out, nkv, hd)  # copies the arrays out of store / keep
    del keep, store
    return result


def synth_kv(seed: int, shape: Tuple[int, int, int], k: bool = True,
             v: bool = True) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """clkvq_synth_kv: a seeded, realistic synthetic (K, V) of shape
    [n_heads, n_tokens, head_dim] (key outlier channels, RoPE-like pairs, a
    sink token, per-token value scales). k/v False leaves that one None."""
    call = "synth_kv"
    c_shape = _shape3(shape, call)
    ko = np.empty(tuple(shape), dtype=np.float32) if k else None
    vo = np.empty(tuple(shape), dtype=np.float32) if v else None
    check_status(_lib.load().clkvq_synth_kv(as_int(seed, "seed", call, 0, (1 << 64) - 1),
                                            ctypes.byref(c_shape), fptr(ko), fptr(vo)),
                 None, call)
    return ko, vo

