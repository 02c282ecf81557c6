"""The hand-written ctypes structs and enums against include/clkvq.h: a C
program compiled here prints every size, offset and enum value."""

import ctypes
import os
import re
import shutil
import subprocess

import pytest

import clkvq
from clkvq import _lib
from conftest import REPO

ENUMS = {
    clkvq.Status: "CLKVQ_", clkvq.Format: "CLKVQ_FMT_", clkvq.Axis: "CLKVQ_AXIS_",
    clkvq.ParamType: "CLKVQ_PARAM_", clkvq.ZeroMode: "CLKVQ_ZERO_",
    clkvq.Scheme: "CLKVQ_SCHEME_", clkvq.Layout: "CLKVQ_LAYOUT_",
    clkvq.AttnVariant: "CLKVQ_ATTN_", clkvq.TuningSource: "CLKVQ_TUNED_",
    clkvq.Fit: "CLKVQ_FIT_",
}


def _c_program():
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "clkvq.h"',
             "int main(void) {"]
    for cname, py in _lib.STRUCTS.items():
        lines.append(f'printf("{cname} sizeof %zu\\n", sizeof({cname}));')
        for fname, _ in py._fields_:
            lines.append(f'printf("{cname} {fname} %zu %zu\\n", offsetof({cname}, {fname}), '
                         f"sizeof((({cname} *)0)->{fname}));")
    for enum, prefix in ENUMS.items():
        for m in enum:
            name = prefix + m.name
            lines.append(f'printf("enum {name} %d\\n", (int){name});')
    lines.append("return 0; }")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler to check the struct layouts with")
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text(_c_program())
    r = subprocess.run([cc, "-std=c11", "-I", os.path.join(REPO, "include"), str(src), "-o",
                        str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_struct_sizes_and_offsets(c_layout):
    checked = 0
    for row in c_layout:
        if row[0] == "enum":
            continue
        py = _lib.STRUCTS[row[0]]
        if row[1] == "sizeof":
            assert ctypes.sizeof(py) == int(row[2]), row
        else:
            field = getattr(py, row[1])
            assert (field.offset, field.size) == (int(row[2]), int(row[3])), row
        checked += 1
    assert checked > 100


def test_layer_config_head_formats(c_layout):
    """clkvq_layer_config's per-head format pointers, the last fields, are
    mirrored (the loop above checks their offsets and sizes)."""
    rows = {(r[0], r[1]) for r in c_layout}
    for name in ("head_format_k", "head_format_v"):
        assert ("clkvq_layer_config", name) in rows
    assert [n for n, _ in _lib.LayerConfigC._fields_][-2:] == ["head_format_k", "head_format_v"]
    assert ctypes.sizeof(_lib.LayerConfigC) == _lib.LayerConfigC.head_format_v.offset + \
        ctypes.sizeof(ctypes.c_void_p)


def test_enum_values(c_layout):
    c_values = {row[1]: int(row[2]) for row in c_layout if row[0] == "enum"}
    for enum, prefix in ENUMS.items():
        for m in enum:
            name = prefix + m.name
            assert c_values[name] == int(m), name
    assert len(c_values) == sum(len(e) for e in ENUMS)


def test_every_prototype_is_exported():
    lib = _lib.load()
    for name in _lib.PROTOTYPES:
        assert hasattr(lib, name), name


# Public functions the binding leaves out on purpose: raw cl_mem entry points
# whose host or paged forms are bound, the autotuner and search (the
# clkvq-tune program runs them), one line each.
NOT_BOUND = {
    "clkvq_quantize": "cl_mem in and out; clkvq_quantize_host is bound",
    "clkvq_dequantize": "cl_mem in and out; clkvq_dequantize_host is bound",
    "clkvq_cache_append_mem": "cl_mem K/V; Cache.append copies host arrays",
    "clkvq_cache_decode": "cl_mem q/out; Cache.decode uses clkvq_cache_decode_host",
    "clkvq_gemv_decode": "an fp32 CLBlast baseline over cl_mem, for benchmarks",
    "clkvq_tune_decode": "the autotuner: clkvq-tune runs it (minutes of timing)",
    "clkvq_tuning_store": "writes autotuner results: clkvq-tune's job",
    "clkvq_precision_search": "the precision search: the clkvq-tune program runs it",
    "clkvq_search_free": "precision search result (not bound)",
    "clkvq_search_front_size": "precision search result (not bound)",
    "clkvq_search_front_point": "precision search result (not bound)",
    "clkvq_search_layer_error": "precision search result (not bound)",
    "clkvq_search_front_index": "precision search result (not bound)",
    "clkvq_search_config": "precision search result (not bound)",
}


def _header_functions():
    text = open(os.path.join(REPO, "include", "clkvq.h")).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for m in re.finditer(r"CLKVQ_API\s+([^;(]*?)\b(clkvq_\w+)\s*\(([^;]*?)\)\s*;", text, re.S):
        args = m.group(3).strip()
        out[m.group(2)] = 0 if args in ("", "void") else args.count(",") + 1
    return out


def test_prototypes_match_the_header():
    funcs = _header_functions()
    assert len(funcs) > 60
    for name, n_args in funcs.items():
        if name in NOT_BOUND:
            assert name not in _lib.PROTOTYPES, name
            continue
        assert name in _lib.PROTOTYPES, f"{name} is in clkvq.h but not bound (or in NOT_BOUND)"
        assert len(_lib.PROTOTYPES[name][1]) == n_args, name
    assert set(_lib.PROTOTYPES) <= set(funcs)
