"""Finding and loading libclkvq, and the ctypes mirror of include/clkvq.h.

Why ctypes (not cffi): it is in the standard library, so the package is
pure Python with no compiler or extra dependency at install time, and the
C API is small and flat (plain structs, enums, pointers). The price is that
the struct layouts below are written by hand; tests/test_abi.py compiles a
small C program against include/clkvq.h and checks every size and offset.

Where the library comes from, first match wins:
  1. $CLKVQ_LIBRARY: a path to libclkvq.so (an error if it is not loadable);
  2. a copy inside this package (``pip install ./python`` from a built tree
     bundles build/libclkvq.so, see python/setup.py);
  3. the build tree of the checkout this package sits in (<repo>/build, or
     $BUILD_DIR), for running straight from the source tree;
  4. the install prefix: the dynamic loader's search path (ldconfig cache,
     LD_LIBRARY_PATH; ``cmake --install build`` puts it in /usr/local/lib)
     and <sys.prefix>/lib.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from ctypes import (POINTER, Structure, c_char, c_char_p, c_double, c_float, c_int, c_size_t,
                    c_uint32, c_uint64, c_void_p)
from typing import List, Optional

# ---------------------------------------------------------------- structs

c_enum = c_int  # every enum of clkvq.h has small non-negative values: an int


class DeviceInfoC(Structure):
    _fields_ = [("platform", c_char * 128), ("vendor", c_char * 128), ("name", c_char * 256),
                ("driver_version", c_char * 128), ("device_version", c_char * 128),
                ("is_gpu", c_int), ("compute_units", c_int), ("max_work_group_size", c_size_t),
                ("local_mem_bytes", c_uint64), ("global_mem_bytes", c_uint64),
                ("max_alloc_bytes", c_uint64), ("device_key", c_char * 384)]


class FormatInfoC(Structure):
    _fields_ = [("format", c_enum), ("name", c_char_p), ("bits_name", c_char_p), ("levels", c_int),
                ("codes_per_block", c_int), ("bytes_per_block", c_int), ("code_bits", c_double)]


class QuantParamsC(Structure):
    _fields_ = [("format", c_enum), ("axis", c_enum), ("group_size", c_int),
                ("clip_alpha", c_float), ("param_type", c_enum), ("zero_mode", c_enum)]


class ShapeC(Structure):
    _fields_ = [("n_heads", c_int), ("n_tokens", c_int), ("head_dim", c_int)]


class QuantLayoutC(Structure):
    _fields_ = [("group_bytes", c_size_t), ("param_bytes", c_size_t), ("n_groups", c_size_t),
                ("code_bytes", c_size_t), ("params_bytes", c_size_t),
                ("bits_per_element", c_double)]


class LayerConfigC(Structure):
    _fields_ = [("scheme", c_enum), ("format_k", c_enum), ("format_v", c_enum),
                ("group_size", c_int), ("clip_k", c_float), ("clip_v", c_float),
                ("param_type", c_enum), ("zero_mode", c_enum), ("window", c_int),
                ("n_sink", c_int), ("residual", c_int), ("perm_k", POINTER(ctypes.c_int32)),
                ("perm_v", POINTER(ctypes.c_int32)), ("key_axis", c_enum), ("rotate", c_int),
                ("rot_seed", c_uint32), ("mean_k", POINTER(c_float)),
                ("mean_v", POINTER(c_float)), ("head_format_k", POINTER(c_enum)),
                ("head_format_v", POINTER(c_enum))]


class CacheConfigC(Structure):
    _fields_ = [("n_layers", c_int), ("n_seqs", c_int), ("capacity", c_int),
                ("n_kv_heads", c_int), ("n_q_heads", c_int), ("head_dim", c_int),
                ("layout_k", c_enum), ("layout_v", c_enum), ("layers", POINTER(LayerConfigC)),
                ("block_size", c_int), ("n_blocks", c_int), ("runtime_tables", c_int)]


class CacheMemoryC(Structure):
    _fields_ = [("device_bytes", c_size_t), ("quantized_bytes", c_size_t),
                ("fp16_bytes", c_size_t), ("bits_per_element", c_double)]


class PoolStatsC(Structure):
    _fields_ = [("block_size", c_int), ("n_blocks", c_int), ("used_blocks", c_int),
                ("free_blocks", c_int), ("shared_blocks", c_int), ("block_bytes", c_size_t)]


class AttnTuningC(Structure):
    _fields_ = [("variant", c_enum), ("wgs", c_int), ("chunk", c_int), ("vw", c_int),
                ("tpl", c_int), ("vwpl", c_int), ("waves", c_int)]


class TuneShapeC(Structure):
    _fields_ = [("scheme", c_enum), ("format_k", c_enum), ("format_v", c_enum),
                ("group_size", c_int), ("head_dim", c_int), ("n_q_heads", c_int),
                ("n_kv_heads", c_int), ("tokens", c_int), ("batch", c_int)]


class TuneParamsC(Structure):
    _fields_ = [("attn", AttnTuningC), ("layout_k", c_enum), ("layout_v", c_enum)]


class DumpInfoC(Structure):
    _fields_ = [("n_layers", c_int), ("n_q_heads", c_int), ("n_kv_heads", c_int),
                ("n_tokens", c_int), ("head_dim", c_int), ("model", c_char * 128)]


class EvalResultC(Structure):
    _fields_ = [("bits_per_element", c_double), ("rel_err", c_double), ("cosine", c_double),
                ("k_rel_err", c_double), ("v_rel_err", c_double), ("n_queries", c_int),
                ("err_sq", c_double), ("ref_sq", c_double), ("k_err_sq", c_double),
                ("k_ref_sq", c_double), ("v_err_sq", c_double), ("v_ref_sq", c_double),
                ("bits_long", c_double)]


class ModelGeometryC(Structure):
    _fields_ = [("n_layers", c_int), ("n_q_heads", c_int), ("n_kv_heads", c_int),
                ("head_dim", c_int)]


class CalibOptionsC(Structure):
    _fields_ = [("fit", ctypes.c_uint), ("clip_lo", c_float), ("clip_hi", c_float),
                ("clip_step", c_float), ("mean_k", POINTER(c_float)), ("mean_v", POINTER(c_float)),
                ("perm_k", POINTER(ctypes.c_int32)), ("perm_v", POINTER(ctypes.c_int32))]


# Every struct the binding mirrors, by its C name (tests/test_abi.py).
STRUCTS = {
    "clkvq_device_info": DeviceInfoC, "clkvq_format_info": FormatInfoC,
    "clkvq_quant_params": QuantParamsC, "clkvq_shape": ShapeC,
    "clkvq_quant_layout": QuantLayoutC, "clkvq_layer_config": LayerConfigC,
    "clkvq_cache_config": CacheConfigC, "clkvq_cache_memory": CacheMemoryC,
    "clkvq_pool_stats": PoolStatsC, "clkvq_attn_tuning": AttnTuningC,
    "clkvq_tune_shape": TuneShapeC, "clkvq_tune_params": TuneParamsC,
    "clkvq_dump_info": DumpInfoC, "clkvq_eval_result": EvalResultC,
    "clkvq_model_geometry": ModelGeometryC, "clkvq_calib_options": CalibOptionsC,
}

# ---------------------------------------------------------------- prototypes

vp = c_void_p  # opaque handles (clkvq_context *, cl_mem, FILE *, ...)
st = c_int  # clkvq_status
P = POINTER
f32p = P(c_float)
i32p = P(ctypes.c_int32)

# name: (restype, argtypes)
PROTOTYPES = {
    "clkvq_status_string": (c_char_p, [st]),
    "clkvq_context_create": (st, [P(vp), c_char_p]),
    "clkvq_context_wrap": (st, [P(vp), vp, vp, vp]),
    "clkvq_context_release": (None, [vp]),
    "clkvq_last_error": (c_char_p, [vp]),
    "clkvq_context_cl_context": (vp, [vp]),
    "clkvq_context_cl_device": (vp, [vp]),
    "clkvq_context_cl_queue": (vp, [vp]),
    "clkvq_context_device_info": (st, [vp, P(DeviceInfoC)]),
    "clkvq_last_device_ms": (c_double, [vp]),
    "clkvq_copy_bandwidth": (st, [vp, c_size_t, c_int, P(c_double)]),
    "clkvq_list_devices": (st, [vp]),
    "clkvq_format_get": (P(FormatInfoC), [c_enum]),
    "clkvq_format_parse": (st, [c_char_p, P(c_enum)]),
    "clkvq_quant_params_default": (QuantParamsC, []),
    "clkvq_quant_layout_get": (st, [P(QuantParamsC), P(ShapeC), P(QuantLayoutC)]),
    "clkvq_quant_params_validate": (st, [vp, P(QuantParamsC), P(ShapeC)]),
    "clkvq_quantize_host": (st, [vp, P(QuantParamsC), P(ShapeC), f32p, i32p, vp, c_size_t, vp,
                                 c_size_t]),
    "clkvq_dequantize_host": (st, [vp, P(QuantParamsC), P(ShapeC), vp, vp, i32p, f32p]),
    "clkvq_scheme_name": (c_char_p, [c_enum]),
    "clkvq_scheme_parse": (st, [c_char_p, P(c_enum)]),
    "clkvq_layer_config_default": (LayerConfigC, [c_enum]),
    "clkvq_cache_plan": (st, [vp, P(CacheConfigC), P(CacheMemoryC)]),
    "clkvq_cache_create": (st, [vp, P(CacheConfigC), P(vp)]),
    "clkvq_cache_release": (None, [vp]),
    "clkvq_cache_append": (st, [vp, c_int, c_int, c_int, f32p, f32p]),
    "clkvq_cache_length": (st, [vp, c_int, c_int, P(c_int)]),
    "clkvq_cache_truncate": (st, [vp, c_int, c_int]),
    "clkvq_cache_read": (st, [vp, c_int, c_int, f32p, f32p]),
    "clkvq_cache_decode_host": (st, [vp, c_int, f32p, f32p, c_float]),
    "clkvq_cache_decode_multi": (st, [vp, c_int, c_int, vp, vp, c_float]),
    "clkvq_cache_fork": (st, [vp, c_int, c_int]),
    "clkvq_cache_copy_blocks": (st, [vp, P(c_int), P(c_int), c_int]),
    "clkvq_cache_pool_stats": (st, [vp, c_int, P(PoolStatsC)]),
    "clkvq_cache_append_paged": (st, [vp, c_int, c_int, c_int, vp, vp, vp, c_int]),
    "clkvq_cache_decode_paged": (st, [vp, c_int, c_int, vp, vp, c_float, vp, c_int]),
    "clkvq_cache_set_tuning": (st, [vp, P(AttnTuningC)]),
    "clkvq_cache_get_tuning": (st, [vp, P(AttnTuningC)]),
    "clkvq_cache_prefill_host": (st, [vp, c_int, c_int, c_int, f32p, f32p, c_float]),
    "clkvq_tuning_lookup": (st, [vp, P(TuneShapeC), P(TuneParamsC), P(c_enum)]),
    "clkvq_tuning_show": (st, [vp, vp]),
    "clkvq_tuning_source_name": (c_char_p, [c_enum]),
    "clkvq_cache_tuning_source": (st, [vp, c_int, P(c_enum)]),
    "clkvq_model_lookup": (st, [c_char_p, P(ModelGeometryC)]),
    "clkvq_model_canonical": (c_char_p, [c_char_p]),
    "clkvq_model_count": (c_int, []),
    "clkvq_model_name": (c_char_p, [c_int]),
    "clkvq_model_parse": (st, [c_char_p, P(ModelGeometryC)]),
    "clkvq_model_format": (c_int, [P(ModelGeometryC), c_char_p, c_size_t]),
    "clkvq_config_load": (st, [vp, c_char_p, P(LayerConfigC), P(vp)]),
    "clkvq_config_parse": (st, [vp, c_char_p, c_size_t, P(LayerConfigC), P(vp)]),
    "clkvq_config_save": (st, [vp, vp, c_char_p]),
    "clkvq_config_create": (st, [vp, c_char_p, c_int, P(LayerConfigC), c_int, c_int, P(vp)]),
    "clkvq_config_free": (None, [vp]),
    "clkvq_config_n_layers": (c_int, [vp]),
    "clkvq_config_model": (c_char_p, [vp]),
    "clkvq_config_layer": (st, [vp, c_int, P(LayerConfigC)]),
    "clkvq_config_n_heads": (c_int, [vp, c_int]),
    "clkvq_config_head": (st, [vp, c_int, c_int, P(c_enum), P(c_enum)]),
    "clkvq_config_average_bits": (c_double, [vp]),
    "clkvq_config_check_model": (st, [vp, vp, c_int]),
    "clkvq_cache_create_from_config": (st, [vp, vp, c_int, c_int, c_int, c_int, c_int, c_enum,
                                            c_enum, P(vp)]),
    "clkvq_config_geometry": (c_int, [vp, P(ModelGeometryC)]),
    "clkvq_config_check_geometry": (st, [vp, vp, P(ModelGeometryC)]),
    "clkvq_config_set_geometry": (st, [vp, vp, P(ModelGeometryC)]),
    "clkvq_config_tune_shapes": (st, [vp, vp, P(ModelGeometryC), c_int, c_int, P(TuneShapeC),
                                      c_int, P(c_int), P(c_int), P(c_int)]),
    "clkvq_config_load_for_model": (st, [vp, c_char_p, P(LayerConfigC), P(ModelGeometryC),
                                         P(vp)]),
    "clkvq_config_store": (st, [vp, vp, c_char_p, c_char_p, c_size_t]),
    "clkvq_config_for_model": (st, [vp, c_char_p, P(vp), c_char_p, c_size_t]),
    "clkvq_cache_create_for_model": (st, [vp, c_char_p, c_int, c_int, c_enum, c_enum, P(vp)]),
    "clkvq_config_show": (st, [vp, vp]),
    "clkvq_dump_open": (st, [vp, c_char_p, P(vp)]),
    "clkvq_dump_open_memory": (st, [vp, c_void_p, c_size_t, P(vp)]),
    "clkvq_dump_close": (None, [vp]),
    "clkvq_dump_info_get": (st, [vp, P(DumpInfoC)]),
    "clkvq_dump_read": (st, [vp, c_int, c_char, f32p]),
    "clkvq_dump_write": (st, [vp, c_char_p, P(DumpInfoC), P(f32p), P(f32p), P(f32p), c_int]),
    "clkvq_eval_layer": (st, [vp, P(LayerConfigC), c_int, c_int, c_int, c_int, f32p, f32p, f32p,
                              c_int, P(EvalResultC)]),
    "clkvq_calibrate_permutation": (st, [vp, P(ShapeC), f32p, c_int, i32p]),
    "clkvq_calibrate_clip": (st, [vp, P(QuantParamsC), P(ShapeC), f32p, i32p, c_float, c_float,
                                  c_float, P(c_float), P(c_double)]),
    "clkvq_calibrate_layer": (st, [vp, P(LayerConfigC), c_int, c_int, c_int, f32p, f32p,
                                   P(CalibOptionsC), P(LayerConfigC)]),
    "clkvq_synth_kv": (st, [c_uint64, P(ShapeC), f32p, f32p]),
}


# ---------------------------------------------------------------- loading


class LibraryNotFoundError(ImportError):
    """libclkvq could not be found or loaded; the message lists every place tried."""


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_path: Optional[str] = None

_SONAMES = ("libclkvq.so.0", "libclkvq.so", "libclkvq.dylib", "clkvq.dll")


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _candidates() -> List[str]:
    """Paths to try, in order (the dynamic loader's own search comes last)."""
    out = []
    pkg = _package_dir()
    out += [os.path.join(pkg, n) for n in _SONAMES]
    build_dirs = []
    if os.environ.get("BUILD_DIR"):
        build_dirs.append(os.environ["BUILD_DIR"])
    repo = os.path.dirname(os.path.dirname(pkg))  # <repo>/python/clkvq -> <repo>
    if os.path.isfile(os.path.join(repo, "include", "clkvq.h")):
        build_dirs.append(os.path.join(repo, "build"))
    for d in build_dirs:
        out += [os.path.join(d, n) for n in _SONAMES]
    out += [os.path.join(sys.prefix, "lib", n) for n in _SONAMES]
    return out


def _bind(lib: ctypes.CDLL) -> None:
    missing = []
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    if missing:
        raise LibraryNotFoundError(
            f"{lib._name} lacks {', '.join(missing)}: it is older or newer than this clkvq "
            "package; rebuild the library and reinstall the package from the same tree")


def _load_from(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    _bind(lib)
    return lib


def load() -> ctypes.CDLL:
    """The loaded library (loaded on first use)."""
    global _lib, _path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        env = os.environ.get("CLKVQ_LIBRARY")
        if env:
            try:
                lib = _load_from(env)
            except OSError as e:
                raise LibraryNotFoundError(
                    f"CLKVQ_LIBRARY={env} could not be loaded: {e}") from None
            _lib, _path = lib, env
            return lib
        tried = []
        for p in _candidates():
            if not os.path.exists(p):
                tried.append(f"{p} (absent)")
                continue
            try:
                lib = _load_from(p)
            except OSError as e:
                tried.append(f"{p} ({e})")
                continue
            _lib, _path = lib, p
            return lib
        found = ctypes.util.find_library("clkvq")
        for name in ([found] if found else []) + list(_SONAMES[:2]):
            try:
                lib = _load_from(name)
            except OSError as e:
                tried.append(f"{name} via the dynamic loader ({e})")
                continue
            _lib, _path = lib, name
            return lib
        raise LibraryNotFoundError(
            "libclkvq not found. Build it (cmake -S . -B build && cmake --build build) and "
            "either reinstall this package from that tree (pip install ./python), set "
            "CLKVQ_LIBRARY=/path/to/libclkvq.so, or install it (cmake --install build). "
            "Tried:\n  " + "\n  ".join(tried))


def library_path() -> str:
    """Where the loaded libclkvq came from (loads it if need be)."""
    load()
    assert _path is not None
    return _path


# ---------------------------------------------------------------- C stdio


class _Libc:
    """tmpfile/fread from the C library, for the calls that print to a FILE *."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.tmpfile.restype = c_void_p
        libc.tmpfile.argtypes = []
        libc.fclose.argtypes = [c_void_p]
        libc.fflush.argtypes = [c_void_p]
        libc.rewind.argtypes = [c_void_p]
        libc.fread.restype = c_size_t
        libc.fread.argtypes = [c_void_p, c_size_t, c_size_t, c_void_p]
        self.c = libc


_libc: Optional[_Libc] = None


def capture_file_output(call) -> tuple:
    """Runs call(FILE *) on a temporary C stream; returns (its result, the text)."""
    global _libc
    if _libc is None:
        _libc = _Libc()
    libc = _libc.c
    f = libc.tmpfile()
    if not f:
        raise OSError("tmpfile() failed")
    try:
        result = call(f)
        libc.fflush(f)
        libc.rewind(f)
        chunks = []
        buf = ctypes.create_string_buffer(65536)
        while True:
            n = libc.fread(buf, 1, len(buf), f)
            if n == 0:
                break
            chunks.append(buf.raw[:n])
        return result, b"".join(chunks).decode("utf-8", "replace")
    finally:
        libc.fclose(f)
