"""Cache: read-back against the quantize kernels, attention against fp64
attention over what the cache gives back, pages, forks, runtime tables."""

import math

import numpy as np
import pytest

import clkvq
from conftest import HD, NKV, NQ, SCHEMES, attention, rng

C = np.ascontiguousarray
SCALE = 1.0 / math.sqrt(HD)


def make(ctx, spec="token:k4v4:g32", **kw):
    args = dict(n_layers=2, n_seqs=2, capacity=128, n_kv_heads=NKV, n_q_heads=NQ, head_dim=HD)
    args.update(kw)
    return clkvq.Cache(ctx, spec, **args)


def kv(seed, n):
    return clkvq.synth_kv(seed, (NKV, n, HD))


def queries(seed, *shape):
    return rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kbits,vbits", [("8", "2"), ("4", "1.5")])
def test_read_back_is_the_quantize_kernels(ctx, kbits, vbits):
    k, v = kv(1, 70)
    with make(ctx, f"token:k{kbits}v{vbits}:g32") as c:
        c.append(1, 0, C(k[:, :33]), C(v[:, :33]))
        c.append(1, 0, C(k[:, 33:]), C(v[:, 33:]))
        assert c.length(1, 0) == 70 and c.length(0, 0) == 0 and c.length(1, 1) == 0
        kr, vr = c.read(1, 0)
    for x, back, bits in ((k, kr, kbits), (v, vr, vbits)):
        qp = clkvq.QuantParams(bits, group_size=32)
        assert np.array_equal(back, clkvq.dequantize(ctx, clkvq.quantize(ctx, x, qp)))


def test_fp16_scheme_reads_back_fp16(ctx):
    k, v = kv(2, 50)
    with make(ctx, "fp16") as c:
        c.append(0, 1, k, v)
        kr, vr = c.read(0, 1)
    assert np.array_equal(kr, k.astype(np.float16).astype(np.float32))
    assert np.array_equal(vr, v.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("spec", SCHEMES)
def test_decode_is_attention_over_the_read_back(ctx, spec):
    with make(ctx, spec) as c:
        for s in range(2):
            k, v = kv(10 + s, 40 + 30 * s)
            c.append(0, s, k, v)
        q = queries(3, 2, NQ, HD)
        out = c.decode(0, q, SCALE)
        for s in range(2):
            kr, vr = c.read(0, s)
            ref = attention(q[s][:, None, :], kr, vr, SCALE)[:, 0]
            assert np.abs(out[s] - ref).max() <= 2e-5 * np.abs(ref).max() + 1e-6
        # scale defaults to 1/sqrt(head_dim); out= is filled in place
        buf = np.empty((2, NQ, HD), np.float32)
        assert c.decode(0, q, out=buf) is buf and np.array_equal(buf, out)


@pytest.mark.parametrize("field", ["rot", "kc"])
def test_rotation_and_channel_keys_in_the_fused_decode(ctx, field):
    """The query is rotated and the output rotated back inside decode: the
    fused result is attention over the (unrotated) read-back."""
    k, v = kv(7, 90)
    q = queries(8, 2, NQ, HD)
    with make(ctx, SCHEMES[3] + ":" + field) as c:
        c.append(0, 0, k, v)
        c.append(0, 1, *kv(8, 40))
        out = c.decode(0, q)
        for s in range(2):
            kr, vr = c.read(0, s)
            ref = attention(q[s][:, None, :], kr, vr, SCALE)[:, 0]
            assert np.abs(out[s] - ref).max() <= 2e-5 * np.abs(ref).max()
        exact = attention(q[0][:, None, :], k, v, SCALE)[:, 0]
        assert np.abs(out[0] - exact).max() < 0.5 * np.abs(exact).max()


def test_centering_means_are_added_back(ctx):
    k, v = kv(9, 60)
    mk, mv = C(k.mean(1)), C(v.mean(1))
    lc = clkvq.parse_spec("token:k4v4:g32").config.replace(mean_k=mk, mean_v=mv)
    with make(ctx, lc, n_layers=1, n_seqs=1) as c:
        c.append(0, 0, k, v)
        kr, vr = c.read(0, 0)
    plain = clkvq.dequantize(ctx, clkvq.quantize(ctx, k))
    # centred rows have a smaller range: they come back closer than plain q4
    assert np.abs(kr - k).max() < np.abs(plain - k).max()
    assert np.abs(vr - v).max() < 0.2 * np.abs(v).max()


def test_decode_multi_and_prefill_are_causal(ctx):
    with make(ctx, "token:k4v4:g32") as c:
        for s in range(2):
            c.append(1, s, *kv(20 + s, 50))
        q = queries(4, 2, 3, NQ, HD)
        out = c.decode_multi(1, q, SCALE)
        for s in range(2):
            kr, vr = c.read(1, s)
            ref = attention(C(q[s].transpose(1, 0, 2)), kr, vr, SCALE, causal_from=47)
            assert np.abs(out[s] - ref.transpose(1, 0, 2)).max() <= 2e-5 * np.abs(ref).max()
        one = c.decode_multi(1, C(q[:, 2:]), SCALE)
        assert np.abs(one[:, 0] - c.decode(1, C(q[:, 2]), SCALE)).max() < 1e-5
        qp = queries(5, NQ, 4, HD)
        pre = c.prefill(1, 0, qp, SCALE)
        kr, vr = c.read(1, 0)
        ref = attention(qp, kr, vr, SCALE, causal_from=46)
        assert np.abs(pre - ref).max() <= 1e-4 * np.abs(ref).max()


def test_truncate(ctx):
    k, v = kv(30, 80)
    with make(ctx, "token:k4v4:g32") as c:
        c.append(0, 0, k, v)
        full = c.read(0, 0)
        with pytest.raises(clkvq.InvalidArgumentError, match="layer 1 holds 0"):
            c.truncate(0, 30)  # every layer must hold the tokens kept
        c.append(1, 0, k, v)
        c.truncate(0, 30)
        assert c.length(0, 0) == 30 and c.length(1, 0) == 30
        kr, vr = c.read(0, 0)
        assert np.array_equal(kr, full[0][:, :30]) and np.array_equal(vr, full[1][:, :30])
        assert c.read(0, 0, k=False)[0] is None
        c.truncate(0)
        assert c.length(0, 0) == 0 and c.read(0, 0)[0].shape == (NKV, 0, HD)


def test_paged_cache_fork_and_pool(ctx):
    k, v = kv(40, 70)
    with make(ctx, "token:k4v4:g32") as flat, \
            make(ctx, "token:k4v4:g32", block_size=16, n_seqs=3) as paged:
        flat.append(0, 0, k, v)
        paged.append(0, 0, k, v)
        assert np.array_equal(paged.read(0, 0)[0], flat.read(0, 0)[0])
        st = paged.pool_stats(0)
        assert st.block_size == 16 and st.used_blocks == 5 and st.shared_blocks == 0
        assert st.free_blocks == st.n_blocks - 5 and st.block_bytes > 0
        paged.fork(0, 1)
        assert paged.pool_stats(0).shared_blocks == 5
        assert np.array_equal(paged.read(0, 1)[0], paged.read(0, 0)[0])
        k2, v2 = kv(41, 5)
        paged.append(0, 1, k2, v2)  # copy-on-write of the last page
        assert paged.length(0, 0) == 70 and paged.length(0, 1) == 75
        assert np.array_equal(paged.read(0, 0)[0], flat.read(0, 0)[0])
        paged.truncate(1, 0)
        assert paged.pool_stats(0).shared_blocks == 0
        with pytest.raises(clkvq.ClkvqError):
            paged.fork(0, 0)


def test_out_of_blocks_changes_nothing(ctx):
    k, v = kv(50, 40)
    with make(ctx, "token:k4v4:g32", block_size=16, n_blocks=3) as c:
        c.append(0, 0, C(k[:, :30]), C(v[:, :30]))
        before = c.read(0, 0)
        with pytest.raises(clkvq.OutOfBlocksError) as e:
            c.append(0, 1, C(k[:, :30]), C(v[:, :30]))
        assert e.value.status_name == "CLKVQ_ERR_OUT_OF_BLOCKS" and e.value.message
        assert c.length(0, 1) == 0 and c.pool_stats(0).used_blocks == 2
        assert np.array_equal(c.read(0, 0)[0], before[0])


def test_runtime_tables(ctx):
    """The caller's block manager: pages named by its table, copy_blocks as
    its copy-on-write step; decode_paged matches the library-managed cache."""
    k, v = kv(60, 40)
    q = queries(6, 2, 2, NQ, HD)
    with make(ctx, "token:k4v4:g32", block_size=16, n_blocks=8, runtime_tables=True,
              capacity=48) as rt, \
            make(ctx, "token:k4v4:g32", block_size=16, capacity=48) as lib:
        table = np.array([[5, 2, 7], [1, 0, 3]], dtype=np.int32)
        for s in range(2):
            rt.append_paged(0, s, k, v, table)
            lib.append(0, s, k, v)
        assert rt.length(0, 1) == 40
        want = lib.decode_multi(0, q)
        got = rt.decode_paged(0, q, table)
        assert np.abs(got - want).max() < 1e-5
        rt.copy_blocks([5, 2, 7], [4, 6, 1])  # seq 0's pages into new ones
        got2 = rt.decode_paged(0, q, np.array([[4, 6, 1], [4, 6, 1]], dtype=np.int32))
        assert np.abs(got2[0] - got[0]).max() < 1e-6
        assert rt.pool_stats(0).used_blocks == -1
        with pytest.raises(clkvq.InvalidArgumentError):
            rt.append_paged(0, 0, k, v, np.array([[99, 2, 7], [1, 0, 3]], dtype=np.int32))


def test_float16_append_and_queries(ctx):
    k, v = kv(70, 33)
    q = queries(7, 2, NQ, HD)
    with make(ctx) as a, make(ctx) as b:
        a.append(0, 0, k.astype(np.float16), v.astype(np.float16))
        b.append(0, 0, k.astype(np.float16).astype(np.float32),
                 v.astype(np.float16).astype(np.float32))
        assert np.array_equal(a.read(0, 0)[0], b.read(0, 0)[0])
        assert np.array_equal(a.decode(0, q.astype(np.float16)),
                              b.decode(0, q.astype(np.float16).astype(np.float32)))


def test_layers_plan_memory_and_tuning(ctx):
    specs = [SCHEMES[1], SCHEMES[2]]
    with clkvq.Cache(ctx, specs, capacity=256, n_kv_heads=NKV, n_q_heads=NQ,
                     head_dim=HD) as c:
        assert c.n_layers == 2 and c.layers[1].scheme == clkvq.Scheme.KIVI
        plan = clkvq.Cache.plan(ctx, specs, capacity=256, n_kv_heads=NKV, n_q_heads=NQ,
                                head_dim=HD)
        assert c.memory == plan and plan.quantized_bytes > 0 and plan.fp16_bytes > 0
        t = c.tuning
        assert t.chunk > 0
        new = clkvq.AttnTuning("cooperative", 16, 64, 0)
        c.tuning = new
        got = c.tuning  # vw 0: the default, resolved
        assert (got.variant, got.wgs, got.chunk) == (clkvq.AttnVariant.COOPERATIVE, 16, 64)
        c.append(0, 0, *kv(80, 100))
        kr, vr = c.read(0, 0)
        q = queries(8, 1, NQ, HD)
        ref = attention(q[0][:, None, :], kr, vr, SCALE)[:, 0]
        assert np.abs(c.decode(0, q)[0] - ref).max() <= 2e-5 * np.abs(ref).max()
        c.tuning = None
        assert c.tuning == t
        with pytest.raises(clkvq.ClkvqError):
            c.tuning = clkvq.AttnTuning("cooperative", 3, 64, 0)  # not a power of two
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.Cache(ctx, specs, n_layers=3, capacity=16, n_kv_heads=NKV, head_dim=HD)
