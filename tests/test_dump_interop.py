#!/usr/bin/env python3
"""Interop of clkvq calibration dumps with the real `safetensors` package.

    python3 tests/test_dump_interop.py BUILD/tests/dump_check

1. Files written by numpy + safetensors (F32, F16, BF16, mixed dtypes, GQA,
   with and without __metadata__) are read by our C reader (dump_check read)
   to exactly the values safetensors stored: F32 bit for bit, F16 and BF16
   as their exact fp32 widening.
2. Dumps written by our C writer (dump_check write, F32 and F16) are loaded
   by safetensors.numpy.load_file to exactly the values the writer was
   given (F16: rounded to nearest even by numpy's own astype(float16)), with
   the shapes, dtypes and __metadata__ we promise.
3. Files that safetensors itself refuses (truncated, overlapping tensors)
   are refused by our reader as CLKVQ_ERR_CORRUPT too.

Needs numpy and safetensors (pip install numpy safetensors; ml_dtypes is
optional and adds a BF16 case through save_file). Without them the script
exits 77 (ctest's SKIP_RETURN_CODE), except under CI=true, where a missing
package is a failure. Prints PASS/FAIL per case and "N passed, N failed";
exits 1 on any failure.
"""

import os
import subprocess
import sys
import tempfile

PASSED = []
FAILED = []


def report(name, ok, why=""):
    if ok:
        PASSED.append(name)
        print(f"PASS {name}")
    else:
        FAILED.append(name)
        print(f"FAIL {name}: {why}")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    dump_check = os.path.abspath(sys.argv[1])
    try:
        import numpy as np
        import safetensors
        import safetensors.numpy as stnp
    except ImportError as e:
        if os.environ.get("CI", "") not in ("", "0", "false"):
            print(f"FAIL imports: {e} (CI installs numpy and safetensors)")
            print("0 passed, 1 failed")
            return 1
        print(f"SKIP: {e}; pip install numpy safetensors to run this test")
        return 77

    with tempfile.TemporaryDirectory(prefix="clkvq-interop-") as tmp:
        run_cases(np, safetensors, stnp, dump_check, tmp)

    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


def run_cases(np, safetensors, stnp, dump_check, tmp):
    rng = np.random.default_rng(1234)

    def c_read(path):
        """Runs dump_check read; returns (info dict, flat float32) or (error line, None)."""
        raw = os.path.join(tmp, "read.bin")
        r = subprocess.run([dump_check, "read", path, raw], capture_output=True, text=True)
        if r.returncode != 0:
            return (r.stdout + r.stderr).strip(), None
        line = r.stdout.strip().splitlines()[0]
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        return fields, np.fromfile(raw, dtype="<f4")

    def expected_flat(tensors, n_layers, widen):
        parts = []
        for i in range(n_layers):
            for w in "qkv":
                parts.append(widen(tensors[f"layers.{i}.{w}"]).ravel())
        return np.concatenate(parts)

    def bits_equal(a, b):
        a = np.ascontiguousarray(a, dtype="<f4")
        b = np.ascontiguousarray(b, dtype="<f4")
        return a.shape == b.shape and np.array_equal(a.view("<u4"), b.view("<u4"))

    def make(n_layers, hq, hkv, t, d, dtype):
        out = {}
        for i in range(n_layers):
            for w, h in (("q", hq), ("k", hkv), ("v", hkv)):
                x = rng.standard_normal((h, t, d)).astype(np.float32) * 3
                if w == "k":
                    x[:, :, 0] *= 40  # an outlier channel, as real keys have
                out[f"layers.{i}.{w}"] = x.astype(dtype)
        return out

    def check_read(name, path, tensors, n_layers, hq, hkv, t, d, model, widen):
        info, values = c_read(path)
        if values is None:
            report(name, False, f"reader failed: {info}")
            return
        want_info = {"layers": str(n_layers), "q_heads": str(hq), "kv_heads": str(hkv),
                     "tokens": str(t), "head_dim": str(d), "model": model}
        if info != want_info:
            report(name, False, f"info {info} != {want_info}")
            return
        want = expected_flat(tensors, n_layers, widen)
        if not bits_equal(values, want):
            bad = int(np.sum(values.view("<u4") != want.view("<u4"))) if values.shape == want.shape else -1
            report(name, False, f"{bad} of {want.size} values differ (shape {values.shape} vs {want.shape})")
            return
        report(name, True)

    def f32(x):
        return x.astype(np.float32)

    # ---- 1. safetensors writes, we read
    x = make(3, 8, 2, 17, 64, np.float32)
    p = os.path.join(tmp, "py_f32.safetensors")
    stnp.save_file(x, p, metadata={"model": "py/f32-model", "notes": "written by safetensors"})
    check_read("safetensors F32 -> C reader", p, x, 3, 8, 2, 17, 64, "py/f32-model", f32)

    x = make(2, 4, 4, 33, 32, np.float16)
    p = os.path.join(tmp, "py_f16.safetensors")
    stnp.save_file(x, p)  # no __metadata__ at all
    check_read("safetensors F16 -> C reader", p, x, 2, 4, 4, 33, 32, "", f32)

    # BF16: numpy has no bfloat16; the bits are the upper half of an f32
    # (rounded to nearest even here, as torch does).
    def to_bf16_bits(a):
        u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16)

    def bf16_widen(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32)

    def save_bf16(tensors_bits, path, metadata, other=None):
        """Writes uint16 bit arrays as BF16 through safetensors' own serializer."""
        other = other or {}
        try:
            import ml_dtypes
            arrays = {k: v.view(ml_dtypes.bfloat16) for k, v in tensors_bits.items()}
            arrays.update(other)
            stnp.save_file(arrays, path, metadata=metadata)
            return "save_file+ml_dtypes"
        except ImportError:
            pass
        specs, keep = {}, []
        for k, v in list(tensors_bits.items()) + list(other.items()):
            v = np.ascontiguousarray(v)
            keep.append(v)
            dt = "bfloat16" if k in tensors_bits else v.dtype.name
            if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.7
                specs[k] = safetensors.TensorSpec(dtype=dt, shape=list(v.shape),
                                                  data_ptr=v.ctypes.data, data_len=v.nbytes)
            else:
                specs[k] = {"dtype": dt, "shape": list(v.shape), "data": v.tobytes()}
        safetensors.serialize_file(specs, path, metadata=metadata)
        return "serialize_file"

    x = make(2, 6, 3, 9, 128, np.float32)
    bits = {k: to_bf16_bits(v) for k, v in x.items()}
    bits["layers.1.v"].flat[:4] = [0x0001, 0x8000, 0x7F7F, 0xFF7F]  # subnormal, -0, +-max
    p = os.path.join(tmp, "py_bf16.safetensors")
    how = save_bf16(bits, p, {"model": "bf16-model"})
    check_read(f"safetensors BF16 ({how}) -> C reader", p, bits, 2, 6, 3, 9, 128, "bf16-model",
               bf16_widen)

    # Mixed dtypes in one file, odd sizes: tensors at unaligned offsets.
    x = make(2, 2, 1, 7, 5, np.float32)
    mixed = {"layers.0.q": x["layers.0.q"], "layers.0.k": x["layers.0.k"].astype(np.float16),
             "layers.1.q": x["layers.1.q"].astype(np.float16), "layers.1.k": x["layers.1.k"],
             "layers.1.v": x["layers.1.v"].astype(np.float16)}
    vbits = {"layers.0.v": to_bf16_bits(x["layers.0.v"])}
    p = os.path.join(tmp, "py_mixed.safetensors")
    how = save_bf16(vbits, p, {"model": "mixed"}, other=mixed)
    allx = dict(mixed)
    allx.update(vbits)

    def widen_any(a):
        return bf16_widen(a) if a.dtype == np.uint16 else a.astype(np.float32)

    check_read(f"safetensors mixed F32/F16/BF16 ({how}) -> C reader", p, allx, 2, 2, 1, 7, 5,
               "mixed", widen_any)

    # ---- 2. we write, safetensors reads
    for dtype in ("f32", "f16"):
        L, hq, hkv, t, d = 3, 8, 2, 29, 64
        p = os.path.join(tmp, f"c_{dtype}.safetensors")
        raw = os.path.join(tmp, f"c_{dtype}.bin")
        model = f"clkvq-synth-{dtype}"
        r = subprocess.run([dump_check, "write", p, dtype, str(L), str(hq), str(hkv), str(t),
                            str(d), "42", model, raw], capture_output=True, text=True)
        name = f"C writer {dtype.upper()} -> safetensors.numpy.load_file"
        if r.returncode != 0:
            report(name, False, (r.stdout + r.stderr).strip())
            continue
        given = np.fromfile(raw, dtype="<f4")
        try:
            loaded = stnp.load_file(p)
            with safetensors.safe_open(p, framework="np") as f:
                meta = f.metadata()
        except Exception as e:  # any refusal by the reference reader is the failure
            report(name, False, f"safetensors refused the file: {e!r}")
            continue
        problems = []
        want_names = {f"layers.{i}.{w}" for i in range(L) for w in "qkv"}
        if set(loaded) != want_names:
            problems.append(f"names {sorted(loaded)}")
        if meta != {"format": "clkvq-kv-dump", "model": model}:
            problems.append(f"metadata {meta}")
        off = 0
        for i in range(L):
            for w, h in (("q", hq), ("k", hkv), ("v", hkv)):
                n = h * t * d
                src = given[off:off + n].reshape(h, t, d)
                off += n
                a = loaded.get(f"layers.{i}.{w}")
                if a is None:
                    continue
                if a.shape != (h, t, d):
                    problems.append(f"layers.{i}.{w} shape {a.shape}")
                elif dtype == "f32":
                    if a.dtype != np.float32 or not bits_equal(a, src):
                        problems.append(f"layers.{i}.{w} values differ")
                else:
                    want = src.astype(np.float16)  # numpy rounds to nearest even, as we do
                    if a.dtype != np.float16 or not np.array_equal(a.view(np.uint16),
                                                                   want.view(np.uint16)):
                        problems.append(f"layers.{i}.{w} f16 values differ")
        if off != given.size:
            problems.append(f"raw has {given.size} values, expected {off}")
        report(name, not problems, "; ".join(problems[:5]))

    # Our own reader agrees with itself on our file (and so with safetensors).
    p = os.path.join(tmp, "c_f16.safetensors")
    loaded = stnp.load_file(p)
    check_read("C writer F16 -> C reader == safetensors values", p, loaded, 3, 8, 2, 29, 64,
               "clkvq-synth-f16", f32)

    # ---- 3. what safetensors refuses, we refuse
    x = make(1, 2, 2, 4, 8, np.float32)
    good = os.path.join(tmp, "good.safetensors")
    stnp.save_file(x, good)
    blob = open(good, "rb").read()

    def both_refuse(name, data):
        p = os.path.join(tmp, "bad.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        try:
            stnp.load_file(p)
            ref_refused = False
        except Exception:
            ref_refused = True
        info, values = c_read(p)
        ours = values is None and "CLKVQ_ERR_CORRUPT" in info
        report(name, ref_refused and ours,
               f"safetensors refused={ref_refused}, ours: {info if values is None else 'opened'}")

    both_refuse("truncated data: both refuse", blob[:-1])
    both_refuse("truncated header: both refuse", blob[:20])
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].decode()
    # point layers.0.v at layers.0.k's bytes
    import json
    h = json.loads(header)
    h["layers.0.v"]["data_offsets"] = h["layers.0.k"]["data_offsets"]
    hb = json.dumps(h).encode()
    hb += b" " * (-len(hb) % 8)
    both_refuse("overlapping tensors: both refuse", len(hb).to_bytes(8, "little") + hb + blob[8 + n:])


if __name__ == "__main__":
    sys.exit(main())
