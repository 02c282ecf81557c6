"""Bad input raises, with the status name and the library's message, and
changes nothing; arrays are checked before any C call."""

import numpy as np
import pytest

import clkvq
from clkvq import Status
from conftest import HD, NKV, NQ


@pytest.fixture(scope="module")
def cache(ctx):
    with clkvq.Cache(ctx, "token:k4v4:g32", n_layers=2, n_seqs=2, capacity=64, n_kv_heads=NKV,
                     n_q_heads=NQ, head_dim=HD) as c:
        yield c


def kv(n, dtype=np.float32):
    k, v = clkvq.synth_kv(1, (NKV, n, HD))
    return k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8, np.complex64])
def test_wrong_dtype(cache, dtype):
    k, v = kv(4, dtype)
    with pytest.raises(clkvq.InvalidArgumentError, match=f"k has dtype {np.dtype(dtype)}") as e:
        cache.append(0, 0, k, v)
    assert e.value.status == Status.ERR_INVALID_ARG
    assert e.value.status_name == "CLKVQ_ERR_INVALID_ARG" and isinstance(e.value, ValueError)


@pytest.mark.parametrize("shape", [(NKV, 4), (NKV + 1, 4, HD), (NKV, 4, HD - 1), (1, NKV, 4, HD)])
def test_wrong_shape(cache, shape):
    k = np.zeros(shape, np.float32)
    with pytest.raises(clkvq.InvalidArgumentError, match="k has shape"):
        cache.append(0, 0, k, k)


def test_v_must_match_k(cache):
    k, v = kv(4)
    with pytest.raises(clkvq.InvalidArgumentError, match="v has shape"):
        cache.append(0, 0, k, np.ascontiguousarray(v[:, :3]))


def test_not_contiguous(cache):
    k, v = kv(8)
    with pytest.raises(clkvq.InvalidArgumentError, match="not C-contiguous"):
        cache.append(0, 0, k[:, ::2], v[:, ::2])
    with pytest.raises(clkvq.InvalidArgumentError, match="not C-contiguous"):
        cache.decode(0, np.zeros((NQ, 2, HD), np.float32).transpose(1, 0, 2))


def test_not_an_array(cache):
    with pytest.raises(clkvq.InvalidArgumentError, match="numpy array"):
        cache.append(0, 0, [[[0.0] * HD]] * NKV, [[[0.0] * HD]] * NKV)


@pytest.mark.parametrize("bad", [1.0, "0", True, None])
def test_bad_index_types(cache, bad):
    k, v = kv(2)
    with pytest.raises(clkvq.InvalidArgumentError):
        cache.append(bad, 0, k, v)


def test_library_checks_carry_its_message(cache):
    k, v = kv(2)
    for layer, seq in [(2, 0), (0, 2), (-1, 0)]:
        with pytest.raises(clkvq.InvalidArgumentError) as e:
            cache.append(layer, seq, k, v)
        assert e.value.message, "the library's clkvq_last_error text"
        assert e.value.call == "Cache.append"
    assert cache.length(0, 0) == 0


def test_capacity_and_nonfinite_change_nothing(cache):
    k, v = kv(40)
    cache.append(1, 1, k, v)
    before = cache.read(1, 1)
    with pytest.raises(clkvq.InvalidArgumentError, match="capacity"):
        cache.append(1, 1, k, v)  # 80 > 64
    bad = k.copy()
    bad[1, 0, 3] = np.nan
    with pytest.raises(clkvq.NonFiniteError) as e:
        cache.append(1, 1, bad[:, :4].copy(), v[:, :4].copy())
    assert e.value.status_name == "CLKVQ_ERR_NONFINITE"
    big = k[:, :4].copy()
    big[0, 0, 0] = 1e6
    with pytest.raises(clkvq.NonFiniteError):
        cache.append(1, 1, big, v[:, :4].copy())
    assert cache.length(1, 1) == 40
    after = cache.read(1, 1)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    cache.truncate(1, 0)


def test_bad_scale_and_out(cache):
    q = np.zeros((2, NQ, HD), np.float32)
    with pytest.raises(clkvq.InvalidArgumentError, match="scale"):
        cache.decode(0, q, float("nan"))
    with pytest.raises(clkvq.InvalidArgumentError, match="out"):
        cache.decode(0, q, out=np.zeros((2, NQ, HD), np.float64))
    with pytest.raises(clkvq.InvalidArgumentError):
        cache.decode_multi(0, np.zeros((2, 17, NQ, HD), np.float32))  # 1..16 queries


def test_bad_cache_configs(ctx):
    args = dict(n_layers=1, capacity=64, n_kv_heads=NKV, n_q_heads=NQ, head_dim=HD)
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.Cache(ctx, "token:k4v4:g48", **args)
    assert e.value.message and e.value.status != Status.OK
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.Cache(ctx, "token:k4v4:g32", **{**args, "n_q_heads": 3})
    with pytest.raises(clkvq.InvalidArgumentError, match="n_layers"):
        clkvq.Cache(ctx, "token:k4v4:g32", capacity=64, n_kv_heads=NKV, head_dim=HD)
    with pytest.raises(clkvq.InvalidArgumentError, match="perm_k has shape"):
        lc = clkvq.LayerConfig.default("skvq").replace(perm_k=np.zeros((1, 3), np.int32))
        clkvq.Cache(ctx, lc, **args)
    with pytest.raises(clkvq.InvalidArgumentError, match="perm_k holds"):
        perm = np.full((NKV, HD), HD, np.int32)
        clkvq.Cache(ctx, clkvq.LayerConfig.default("skvq").replace(perm_k=perm), **args)
    with pytest.raises(clkvq.InvalidArgumentError, match="layout"):
        clkvq.Cache(ctx, "fp16", layout_k="diagonal", **args)


def test_closed_cache(ctx):
    c = clkvq.Cache(ctx, "token:k4v4:g32", n_layers=1, capacity=16, n_kv_heads=NKV,
                    head_dim=HD)
    c.close()
    c.close()
    with pytest.raises(clkvq.ClkvqError, match="closed"):
        c.append(0, 0, *kv(1))


def test_enum_names(ctx):
    with pytest.raises(clkvq.InvalidArgumentError, match="format 'q5' is not one of"):
        clkvq.QuantParams("q5")
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.QuantParams(4)  # an int is ambiguous: bits or enum value
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.quantize(ctx, np.zeros((1, 1, 32), np.float64))
