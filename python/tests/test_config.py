"""Precision configs: KVTuner's files, round trips, caches built from them."""

import glob
import os

import numpy as np
import pytest

import clkvq
from conftest import HD, NKV, NQ, REPO, SCHEMES

PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "kvtuner", "*.yaml")))


@pytest.mark.skipif(not PRESETS, reason="configs/kvtuner not found next to the tests")
def test_kvtuner_presets_load(ctx, tmp_path):
    for path in PRESETS:
        with clkvq.PrecisionConfig.load(path, ctx=ctx) as c:
            assert c.n_layers >= 1 and 1.5 <= c.average_bits <= 8
            c.check_model(c.n_layers)
            with pytest.raises(clkvq.InvalidArgumentError):
                c.check_model(c.n_layers + 1)
            c.save(tmp_path / "back.yaml")
            with clkvq.PrecisionConfig.load(tmp_path / "back.yaml") as b:
                assert b.layers() == c.layers() and b.model == c.model
                assert b.average_bits == c.average_bits


def test_create_save_load_with_perms(ctx, tmp_path):
    perm = np.stack([np.random.default_rng(h).permutation(HD) for h in range(NKV)])
    layers = ["token:k8v4:g32", clkvq.parse_spec("skvq:k2v1.5:g32:w16:s1:a0.9").config.replace(
        perm_k=perm, perm_v=perm[::-1].copy())]
    with clkvq.PrecisionConfig.create(layers, "m", NKV, HD, ctx) as c:
        assert c.n_layers == 2 and c.model == "m"
        assert c.average_bits == pytest.approx((8 + 4 + 2 + 1.5) / 4)
        got = c.layers()
        assert got[1].clip_k == pytest.approx(0.9) and np.array_equal(got[1].perm_k, perm)
        c.save(tmp_path / "c.yaml")
        text = (tmp_path / "c.yaml").read_text()
    assert "perm_k" in text and "nbits_key" in text
    with clkvq.PrecisionConfig.parse(text, n_kv_heads=NKV, head_dim=HD) as p:
        assert p.layers() == got
    with clkvq.PrecisionConfig.load(tmp_path / "c.yaml") as p:
        with pytest.raises(clkvq.InvalidArgumentError, match="n_kv_heads"):
            p.layer(1)  # its permutations need the shape
        assert p.layer(0).format_k == clkvq.Format.Q8


def test_defaults_fill_what_the_file_leaves_out():
    text = "0: {nbits_key: 4, nbits_value: 2}\n1: {nbits_key: 2, nbits_value: 2}\n"
    with clkvq.PrecisionConfig.parse(text, defaults="kivi:g32:r64") as c:
        l0 = c.layer(0)
        assert (l0.scheme, l0.residual, l0.format_v) == (clkvq.Scheme.KIVI, 64, clkvq.Format.Q2)
    with clkvq.PrecisionConfig.parse(text) as c:
        assert c.layer(1).scheme == clkvq.Scheme.TOKEN


def test_cache_from_config(ctx, tmp_path):
    layers = [SCHEMES[2], SCHEMES[1]]
    with clkvq.PrecisionConfig.create(layers) as c:
        c.save(tmp_path / "c.yaml")
        args = dict(capacity=64, n_kv_heads=NKV, n_q_heads=NQ, head_dim=HD)
        with clkvq.Cache.from_config(ctx, c, **args) as a, \
                clkvq.Cache.from_config(ctx, str(tmp_path / "c.yaml"), **args) as b, \
                clkvq.Cache(ctx, layers, **args) as ref:
            k, v = clkvq.synth_kv(3, (NKV, 40, HD))
            for cache in (a, b, ref):
                assert cache.n_layers == 2 and cache.layers[0].format_k == clkvq.Format.Q2
                cache.append(0, 0, k, v)
            assert np.array_equal(a.read(0, 0)[0], ref.read(0, 0)[0])
            assert np.array_equal(b.read(0, 0)[1], ref.read(0, 0)[1])
            assert a.memory == ref.memory


def test_bad_configs(ctx, tmp_path):
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.PrecisionConfig.load(tmp_path / "none.yaml", ctx=ctx)
    assert e.value.status_name == "CLKVQ_ERR_IO"
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.PrecisionConfig.parse("0: {nbits_key: 5, nbits_value: 2}\n")
    assert e.value.status_name == "CLKVQ_ERR_CORRUPT" and "nbits_key" in e.value.message
    per_head = "0:\n  0: {nbits_key: 4, nbits_value: 2}\n  1: {nbits_key: 2, nbits_value: 2}\n"
    with clkvq.PrecisionConfig.parse(per_head) as c:
        assert c.n_heads(0) == 2 and c.head(0, 1) == (clkvq.Format.Q2, clkvq.Format.Q2)
        with pytest.raises(clkvq.InvalidArgumentError, match="head"):
            clkvq.Cache.from_config(ctx, c, capacity=16, n_kv_heads=4, head_dim=HD)
