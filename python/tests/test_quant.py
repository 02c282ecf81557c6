"""quantize / dequantize, layouts, formats, calibration, synthetic data."""

import numpy as np
import pytest

import clkvq
from conftest import HD, NKV, rng, run

# The README's format table: levels, bits/code, codes and bytes per block.
TABLE = {"q8": (256, 8.0, 4, 4), "q4": (16, 4.0, 8, 4), "q3": (8, 3.0, 32, 12),
         "q2": (4, 2.0, 16, 4), "t1.5": (3, 1.6, 5, 1)}


@pytest.mark.parametrize("name", list(TABLE))
def test_format_info(name):
    f = clkvq.format_info(name)
    assert (f.levels, f.code_bits, f.codes_per_block, f.bytes_per_block) == TABLE[name]
    assert f.name == name and f.format.text == name and clkvq.Format.coerce(f.bits_name) == f.format


def test_layout_sizes():
    lay = clkvq.quant_layout(clkvq.QuantParams("q4", group_size=32), (NKV, 10, HD))
    assert lay.n_groups == NKV * 10 * HD // 32
    assert lay.code_bytes == lay.n_groups * 16 and lay.params_bytes == lay.n_groups * 4
    assert lay.bits_per_element == pytest.approx(5.0)
    fp8 = clkvq.quant_layout(clkvq.QuantParams("q4", group_size=128, param_type="fp8"),
                             (NKV, 10, 128))
    assert fp8.bits_per_element == pytest.approx(4.125)


@pytest.mark.parametrize("fmt", ["q8", "q4", "q2", "t1.5"])
def test_roundtrip_error_bound(ctx, fmt):
    x = rng(1).standard_normal((NKV, 16, HD)).astype(np.float32)
    qp = clkvq.QuantParams(fmt, group_size=32)
    q = clkvq.quantize(ctx, x, qp)
    back = clkvq.dequantize(ctx, q)
    g = x.reshape(NKV, 16, HD // 32, 32)
    step = (g.max(-1) - g.min(-1)) / (TABLE[fmt][0] - 1)
    err = np.abs(back - x).reshape(g.shape).max(-1)
    # half a step, plus fp16 rounding of scale (x levels) and zero
    assert (err <= 0.5 * step + step * TABLE[fmt][0] * 2 ** -10 + np.abs(g).max(-1) * 2 ** -10
            ).all()


def test_channel_axis_and_permutation(ctx):
    x = rng(2).standard_normal((NKV, 64, HD)).astype(np.float32)
    qp = clkvq.QuantParams("q4", axis="channel", group_size=32)
    back = clkvq.dequantize(ctx, clkvq.quantize(ctx, x, qp))
    assert np.abs(back - x).max() < 0.5
    perm = np.stack([rng(h).permutation(HD) for h in range(NKV)]).astype(np.int32)
    qt = clkvq.QuantParams("q4", group_size=32)
    with_perm = clkvq.quantize(ctx, x, qt, perm)
    by_hand = clkvq.quantize(ctx, np.ascontiguousarray(
        np.take_along_axis(x, perm[:, None, :], 2)), qt)
    # the kernel's gather is the same as permuting first
    assert np.array_equal(with_perm.codes, by_hand.codes)
    assert np.array_equal(with_perm.params, by_hand.params)
    unperm = clkvq.dequantize(ctx, with_perm)
    packed = clkvq.dequantize(ctx, with_perm, unpermute=False)
    assert np.array_equal(packed, clkvq.dequantize(ctx, by_hand))
    assert np.array_equal(np.take_along_axis(unperm, perm[:, None, :], 2), packed)


def test_float16_input_is_converted(ctx):
    x = rng(3).standard_normal((NKV, 8, HD)).astype(np.float16)
    a = clkvq.quantize(ctx, x)
    b = clkvq.quantize(ctx, x.astype(np.float32))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.params, b.params)


def test_calibrate_permutation_sorts_ranges(ctx):
    k, _ = clkvq.synth_kv(4, (NKV, 128, HD), v=False)
    perm = clkvq.calibrate_permutation(ctx, k, 32)
    assert perm.shape == (NKV, HD)
    for h in range(NKV):
        assert sorted(perm[h]) == list(range(HD))
        rng_ = (k[h].max(0) - k[h].min(0))[perm[h]]
        groups = rng_.reshape(-1, 32)
        # fixed groups of similar range: no group's range interval overlaps the next one's
        lo, hi = groups.min(1), groups.max(1)
        assert (hi[:-1] <= lo[1:]).all() or (lo[:-1] >= hi[1:]).all()


def test_calibrate_clip_mse_is_the_kernels(ctx):
    k, _ = clkvq.synth_kv(5, (NKV, 64, HD), v=False)
    qp = clkvq.QuantParams("q2", group_size=32)
    alpha, mse = clkvq.calibrate_clip(ctx, k, qp, None, 0.8, 1.0, 0.05)
    assert 0.8 <= alpha <= 1.0
    for a in (alpha, 1.0):
        back = clkvq.dequantize(ctx, clkvq.quantize(
            ctx, k, clkvq.QuantParams("q2", group_size=32, clip_alpha=a)))
        got = float(((back.astype(np.float64) - k) ** 2).mean())
        if a == alpha:
            assert got == pytest.approx(mse, rel=1e-3)
        else:
            assert got >= mse * (1 - 1e-3)


def test_synth_kv_matches_the_c_writer(program, tmp_path):
    """dump_check write draws K/V with clkvq_synth_kv(seed * 131 + layer)."""
    path, raw = str(tmp_path / "d.st"), str(tmp_path / "d.raw")
    r = run([program("tests/dump_check"), "write", path, "f32", "2", "3", "3", "20", "32",
             "9", "", raw])
    assert r.returncode == 0, r.stdout
    vals = np.fromfile(raw, dtype="<f4").reshape(2, 3, 3, 20, 32)  # layer, q/k/v, ...
    for layer in range(2):
        k, v = clkvq.synth_kv(9 * 131 + layer, (3, 20, 32))
        assert np.array_equal(vals[layer, 1], k) and np.array_equal(vals[layer, 2], v)


def test_validate_params(ctx):
    clkvq.validate_params(clkvq.QuantParams("q4", group_size=32), (NKV, 4, HD), ctx)
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.validate_params(clkvq.QuantParams("q4", group_size=48), (NKV, 4, HD), ctx)
    assert e.value.message and e.value.status_name.startswith("CLKVQ_ERR_")
