"""The spec grammar against clkvq-eval's: the same strings accepted and
refused (clkvq-eval exits 2 on a bad spec before it opens anything), and
accepted ones giving the same numbers (tests/test_eval.py)."""

import pytest

import clkvq
from clkvq import Axis, Fit, Format, ParamType, Scheme, ZeroMode
from conftest import run

GOOD = ["fp16", "FP16", "token", "token:k4v4:g32", "kivi:k2v2:g32:r128", "token::k8v4",
        "skvq:k2v1.5:g128:w128:s5:a0.92", "skvq:k2v1.5:g128:w128:s5:fp8:calib",
        "skvq:k4v2:w0:s0", "skvq:perm:a0.9", "token:int:fp8", "token:kt1.5v2", "token:kQ4v4",
        "token:a1", "token:a.5", "token:a5e-1", "kivi:r0032", "token:k8v8:",
        # fields clkvq-eval gained: rotation, centering, per-channel skvq keys, fits anywhere
        "token:calib", "kivi:perm", "kivi:center", "token:perm:calib:center", "token:rot",
        "token:rot7", "token:rot00", "token:rot4294967295", "skvq:kc",
        "skvq:k2v2:g32:w128:s5:rot:calib", "skvq:k3v2:g32:w128:s5:kc:fp8:center:calib",
        "token:a0x1p-1", "token:a0x.8"]
BAD = ["", "q4", "fp16:k4v4", "token:k5v4", "token:k4", "token:kv4", "token:k4v", "token:kq4v4",
       "token:k4vq4", "token:g", "token:g0", "token:g-32", "token:g32x", "token:g 32",
       "token:r128", "token:w10", "kivi:s5", "kivi:r0", "skvq:w-1", "skvq:w00", "token:a0",
       "token:a1.5", "token:anan", "token:ainf", "token:a+1", "skvq:calib:a0.9",
       "token:a0.9:calib", "token:foo", "token:g16777217", "skvq:" + "w1:" * 90,
       "token:rot4294967296", "token:rot-1", "token:rotx", "token:rot1.5", "token:rot 1",
       "kivi:kc", "token:kc", "fp16:rot", "fp16:center", "token:centre", "token:a1e-310",
       "token:a0x", "token:a0x2"]


def c_accepts(program, spec):
    r = run([program("clkvq-eval"), "--calib", "/nonexistent/dump.st", "--scheme", spec])
    assert r.returncode in (1, 2), r.stderr
    return r.returncode == 1  # 1: got past the spec to the missing file


@pytest.mark.parametrize("spec", GOOD)
def test_accepted_by_both(program, spec):
    clkvq.parse_spec(spec)
    assert c_accepts(program, spec)


@pytest.mark.parametrize("spec", BAD)
def test_refused_by_both(program, spec):
    with pytest.raises(clkvq.InvalidArgumentError) as e:
        clkvq.parse_spec(spec)
    assert "scheme" in str(e.value)
    assert not c_accepts(program, spec)


def test_fields():
    s = clkvq.parse_spec("skvq:k2v1.5:g32:w16:s1:a0.9:fp8:int")
    c = s.config
    assert (c.scheme, c.format_k, c.format_v, c.group_size, c.window, c.n_sink) == \
        (Scheme.SKVQ, Format.Q2, Format.T15, 32, 16, 1)
    assert c.clip_k == c.clip_v == 0.9 and s.fit == 0 and s.group_given
    assert (c.param_type, c.zero_mode) == (ParamType.FP8_E4M3, ZeroMode.INT)
    k = clkvq.parse_spec("kivi:k2v4:r64").config
    assert (k.residual, k.group_size, k.format_v) == (64, 32, Format.Q4)
    assert clkvq.parse_spec("fp16").config == clkvq.LayerConfig.default("fp16")


def test_fit_fields():
    """calib fits the clips, perm the permutations, center the means (not
    of keys grouped per channel, whose zero points hold their offsets)."""
    fits = {spec: clkvq.parse_spec(spec).fit for spec in
            ("skvq:calib", "token:perm", "token:center", "kivi:center", "skvq:kc:center",
             "token:calib:perm:center")}
    assert fits == {"skvq:calib": Fit.CLIP, "token:perm": Fit.PERM, "token:center": Fit.MEAN,
                    "kivi:center": Fit.MEAN_V, "skvq:kc:center": Fit.MEAN_V,
                    "token:calib:perm:center": Fit.CLIP | Fit.PERM | Fit.MEAN}


def test_rotation_and_channel_keys():
    c = clkvq.parse_spec("skvq:k2v2:g32:rot:kc").config
    assert c.rotate and c.rot_seed == 0 and c.key_axis == Axis.CHANNEL
    c = clkvq.parse_spec("token:rot4294967295").config
    assert c.rotate and c.rot_seed == 4294967295
    with pytest.raises(clkvq.InvalidArgumentError, match="kc is an skvq field"):
        clkvq.parse_spec("kivi:kc")
    with pytest.raises(clkvq.InvalidArgumentError, match="rotation seed"):
        clkvq.parse_spec("token:rot-1")


def test_skvq_group_follows_the_head():
    """skvq without gN groups min(128, head_dim) channels, as clkvq-eval does."""
    s = clkvq.parse_spec("skvq:k2v2")
    assert not s.group_given and s.config.group_size == 128
    assert s.layer_config(64).group_size == 64 and s.layer_config(256).group_size == 128
    assert clkvq.parse_spec("skvq:g32").layer_config(64).group_size == 32
    assert clkvq.parse_spec("token").layer_config(64).group_size == 32


def test_fitting_spec_needs_data(ctx):
    with pytest.raises(clkvq.InvalidArgumentError, match="calibrate_layer"):
        clkvq.Cache(ctx, "skvq:calib", n_layers=1, capacity=16, n_kv_heads=1, head_dim=128)
    with pytest.raises(clkvq.InvalidArgumentError, match="center"):
        clkvq.Cache(ctx, "token:center", n_layers=1, capacity=16, n_kv_heads=1, head_dim=32)
