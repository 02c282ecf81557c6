"""Context, devices and tuning lookups, against the C programs' own output."""

import pytest

import clkvq
from clkvq import Status
from conftest import HD, NKV, NQ, run


def test_list_devices_matches_clkvq_tune(program):
    r = run([program("clkvq-tune"), "--list-devices"])
    assert r.returncode == 0, r.stderr
    assert clkvq.list_devices() == [l for l in r.stdout.splitlines() if l.strip()]
    assert clkvq.list_devices()[0].startswith("0: ")


def test_device_info(ctx):
    info = ctx.device_info
    assert info.name and info.platform and info.device_key
    assert info.compute_units > 0 and info.max_work_group_size > 0
    assert 0 < info.max_alloc_bytes <= info.global_mem_bytes
    assert ctx.cl_context and ctx.cl_device and ctx.cl_queue
    assert info.name in repr(ctx)


def test_context_by_index_and_name(ctx):
    info = ctx.device_info
    with clkvq.Context(0) as c0, clkvq.Context(info.name[:6].lower()) as c1:
        assert c0.device_info.device_key == c1.device_info.device_key
    assert c0.closed and c1.closed


def test_no_such_device():
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.Context("no-such-device-anywhere")
    assert e.value.status == Status.ERR_NO_DEVICE
    assert e.value.status_name == "CLKVQ_ERR_NO_DEVICE"
    assert "no-such-device-anywhere" in e.value.message


@pytest.mark.parametrize("bad", [True, 1.5, b"0", -1])
def test_bad_device_argument(bad):
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.Context(bad)


def test_wrap_shares_the_opencl_objects(ctx):
    w = clkvq.Context.wrap(ctx.cl_context, ctx.cl_device, ctx.cl_queue)
    assert w.cl_context == ctx.cl_context and w.cl_queue == ctx.cl_queue
    k, v = clkvq.synth_kv(1, (NKV, 40, HD))
    with clkvq.Cache(w, "token:k4v4:g32", n_layers=1, capacity=64, n_kv_heads=NKV,
                     n_q_heads=NQ, head_dim=HD) as c:
        c.append(0, 0, k, v)
    w.close()
    assert ctx.device_info.name  # the wrapped objects were retained, not taken
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.Context.wrap(0, ctx.cl_device, ctx.cl_queue)


def test_close_closes_children():
    c = clkvq.Context()
    cache = clkvq.Cache(c, "fp16", n_layers=1, capacity=16, n_kv_heads=NKV, n_q_heads=NQ,
                        head_dim=HD)
    c.close()
    assert cache.closed
    with pytest.raises(clkvq.ClkvqError, match="closed"):
        cache.length(0, 0)
    with pytest.raises(clkvq.ClkvqError, match="closed"):
        c.device_info
    c.close()  # twice is fine


def test_bandwidth_and_device_ms(ctx):
    assert ctx.copy_bandwidth(1 << 20, 2) > 0
    assert isinstance(ctx.last_device_ms(), float)


def test_tuning_show_matches_clkvq_tune(ctx, program):
    """clkvq-tune --show prints the tuning, a blank line, then the configs."""
    r = run([program("clkvq-tune"), "--show"])
    assert r.returncode == 0, r.stderr
    assert clkvq.tuning_show(ctx) + "\n" + clkvq.config_show(ctx) == r.stdout


def test_tuning_lookup(ctx):
    shape = clkvq.TuneShape("token", "q4", "q4", 32, HD, NQ, NKV, 1024, 1)
    params, source = clkvq.tuning_lookup(ctx, shape)
    assert isinstance(source, clkvq.TuningSource)
    assert params.layout_k in (clkvq.Layout.TOKEN_MAJOR, clkvq.Layout.GROUP_PLANAR)
    assert params.attn.chunk > 0
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.tuning_lookup(ctx, clkvq.TuneShape("token", "q5"))
