"""The spec grammar against clkvq-eval's: the same strings accepted and
refused (clkvq-eval exits 2 on a bad spec before it opens anything), and
accepted ones giving the same numbers (tests/test_eval.py)."""

import pytest

import clkvq
from clkvq import Axis, Format, ParamType, Scheme, ZeroMode
from conftest import run

GOOD = ["fp16", "FP16", "token", "token:k4v4:g32", "kivi:k2v2:g32:r128", "token::k8v4",
        "skvq:k2v1.5:g128:w128:s5:a0.92", "skvq:k2v1.5:g128:w128:s5:fp8:calib",
        "skvq:k4v2:w0:s0", "skvq:perm:a0.9", "token:int:fp8", "token:kt1.5v2", "token:kQ4v4",
        "token:a1", "token:a.5", "token:a5e-1", "kivi:r0032", "token:k8v8:"]
BAD = ["", "q4", "fp16:k4v4", "token:k5v4", "token:k4", "token:kv4", "token:k4v", "token:kq4v4",
       "token:k4vq4", "token:g", "token:g0", "token:g-32", "token:g32x", "token:g 32",
       "token:r128", "token:w10", "kivi:s5", "kivi:r0", "skvq:w-1", "skvq:w00", "token:a0",
       "token:a1.5", "token:anan", "token:ainf", "token:a+1", "token:calib", "kivi:perm",
       "skvq:calib:a0.9", "token:foo", "token:g16777217", "skvq:" + "w1:" * 90]


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
    assert c.clip_k == c.clip_v == 0.9 and s.calibrate is None
    assert (c.param_type, c.zero_mode) == (ParamType.FP8_E4M3, ZeroMode.INT)
    k = clkvq.parse_spec("kivi:k2v4:r64").config
    assert (k.residual, k.group_size, k.format_v) == (64, 32, Format.Q4)
    assert clkvq.parse_spec("skvq:calib").calibrate == "calib"
    assert clkvq.parse_spec("skvq:perm").calibrate == "perm"
    assert clkvq.parse_spec("fp16").config == clkvq.LayerConfig.default("fp16")


def test_fields_ahead_of_clkvq_eval():
    """rot and kc are understood here before clkvq-eval has them."""
    c = clkvq.parse_spec("skvq:k2v2:g32:rot:kc").config
    assert c.rotate and c.key_axis == Axis.CHANNEL
    assert clkvq.parse_spec("token:rot").config.rotate
    with pytest.raises(clkvq.InvalidArgumentError, match="kc is an skvq field"):
        clkvq.parse_spec("kivi:kc")
    assert {f.name for f in clkvq.spec.FIELDS if f.ahead} == {"rot", "kc"}


def test_calibrating_spec_needs_data(ctx):
    with pytest.raises(clkvq.InvalidArgumentError, match="calibrate"):
        clkvq.Cache(ctx, "skvq:calib", n_layers=1, capacity=16, n_kv_heads=1, head_dim=128)
