"""clkvq: low-bit KV-cache quantization on OpenCL, from Python (numpy).

A ctypes binding of libclkvq's C API (include/clkvq.h)::

    import numpy as np, clkvq
    ctx = clkvq.Context()                                  # $CLKVQ_DEVICE or the first GPU
    cache = clkvq.Cache(ctx, "skvq:k2v1.5:g32:w16:s1", n_layers=1, capacity=256,
                        n_kv_heads=4, head_dim=32)
    k, v = clkvq.synth_kv(1, (4, 100, 32))                 # [n_kv_heads, n_tokens, head_dim]
    cache.append(0, 0, k, v)                               # layer 0, sequence 0
    out = cache.decode(0, np.random.rand(1, 4, 32).astype(np.float32))

Failing calls raise :class:`ClkvqError` (``status_name``, ``message``);
bad arguments raise :class:`InvalidArgumentError`, a ``ValueError`` too.
"""

from ._lib import LibraryNotFoundError, library_path
from .cache import Cache, CacheMemory, PoolStats
from .config import PrecisionConfig, config_show
from .context import Context, DeviceInfo, default_context, list_devices
from .dump import Dump, DumpInfo, write_dump
from .errors import (ClkvqError, InvalidArgumentError, NonFiniteError, OutOfBlocksError,
                     Status)
from .evaluate import EvalResult, SchemeScore, eval_layer, evaluate_dump
from .models import ModelGeometry, model_canonical, model_geometry, model_lookup, models
from .quant import (QuantLayout, Quantized, calibrate_clip, calibrate_layer,
                    calibrate_permutation, dequantize, quant_layout, quantize, synth_kv,
                    validate_params)
from .spec import Spec, parse_spec
from .tuning import TuneParams, TuneShape, tuning_lookup, tuning_show, tuning_source_name
from .types import (AttnTuning, AttnVariant, Axis, Fit, Format, FormatInfo, LayerConfig,
                    Layout, ParamType, QuantParams, Scheme, TuningSource, ZeroMode, format_info)

__version__ = "0.1.0"

__all__ = [
    "LibraryNotFoundError", "library_path", "Cache", "CacheMemory", "PoolStats",
    "PrecisionConfig", "config_show", "Context", "DeviceInfo", "default_context", "list_devices", "Dump",
    "DumpInfo", "write_dump", "ClkvqError", "InvalidArgumentError", "NonFiniteError",
    "OutOfBlocksError", "Status", "EvalResult", "SchemeScore", "eval_layer", "evaluate_dump",
    "ModelGeometry", "model_canonical", "model_geometry", "model_lookup", "models",
    "QuantLayout", "Quantized", "calibrate_clip", "calibrate_layer", "calibrate_permutation",
    "dequantize", "quant_layout", "quantize", "synth_kv", "validate_params", "Spec",
    "parse_spec", "TuneParams", "TuneShape", "tuning_lookup", "tuning_show",
    "tuning_source_name", "AttnTuning", "AttnVariant", "Axis", "Fit", "Format", "FormatInfo", "LayerConfig", "Layout", "ParamType", "QuantParams",
    "Scheme", "TuningSource", "ZeroMode", "format_info",
]
