"""Per-head bits (KVTuner's per-head configs): LayerConfig head formats
through C and back, caches whose heads carry different (K, V) pairs (one
share per pair) against fp64 attention over their read-back and against
uniform caches of each share's heads, per-head configs from YAML, their
tune shapes, evaluation, and KVTuner's per-head Llama-3-8B file.

The shape and pairs are tests/test_heads.c's (5 kv heads of 64, kivi R32,
K4V2 on heads 0, 2, 3 and K2V2 on 1, 4), so the program variants a cold
machine compiles are shared with the C suite.
"""

import math
import os

import numpy as np
import pytest

import clkvq
from conftest import NKV, REPO, attention, rng

Q4, Q2, Q8 = clkvq.Format.Q4, clkvq.Format.Q2, clkvq.Format.Q8
HEADS, QPK, DIM = 5, 2, 64
HEAD_K = (Q4, Q2, Q4, Q4, Q2)
HEAD_V = (Q2,) * HEADS
SHARES = {(Q4, Q2): [0, 2, 3], (Q2, Q2): [1, 4]}  # in order of each pair's first head
SCALE = 1.0 / math.sqrt(DIM)
LAYOUTS = dict(layout_k="group_planar", layout_v="group_planar")
PER_HEAD_FILE = os.path.join(REPO, "configs", "kvtuner",
                             "meta-llama_Meta-Llama-3-8B-Instruct_k8_v4._per_head.yaml")

C = np.ascontiguousarray


def per_head(**kw):
    lc = clkvq.parse_spec("kivi:g32:r32").config
    return lc.replace(head_format_k=HEAD_K, head_format_v=HEAD_V, **kw)


def kv(seed, n, heads=HEADS):
    k, v = clkvq.synth_kv(seed, (heads, n, DIM))
    return k, v


def queries(seed, *shape):
    return rng(seed).standard_normal(shape).astype(np.float32)


def close_to(out, ref):
    """The cache tests' tolerance: fused decode against fp64 attention over
    the read-back, relative to the output's size."""
    return np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max()


def per_head_yaml(layers, pairs_of_layer):
    """A KVTuner per-head file: layer -> head -> {nbits_key, nbits_value}."""
    lines = []
    for layer in range(layers):
        lines.append(f"{layer}:")
        for h, (fk, fv) in enumerate(pairs_of_layer(layer)):
            lines.append(f"  {h}: {{nbits_key: {fk.bits_name}, nbits_value: {fv.bits_name}}}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- LayerConfig


def test_head_formats_round_trip_through_c():
    lc = per_head()
    assert lc.head_format_k == HEAD_K and lc.n_heads == HEADS
    c, keep = lc.to_c(HEADS, DIM)
    assert [c.head_format_k[h] for h in range(HEADS)] == [int(f) for f in HEAD_K]
    assert [c.head_format_v[h] for h in range(HEADS)] == [int(f) for f in HEAD_V]
    back = clkvq.LayerConfig.from_c(c, HEADS, DIM)
    del keep
    assert back == lc and back.head_format_k == HEAD_K
    assert back.head_pairs(HEADS) == list(zip(HEAD_K, HEAD_V))
    # names and one side only; the other side is format_v on every head
    one = clkvq.LayerConfig(format_v="q8", head_format_k=["q4", "2", "q4", "q4", "q2"])
    assert one.head_format_k == HEAD_K and one.head_format_v is None
    assert one.head_pairs(HEADS)[1] == (Q2, Q8)
    c, keep = one.to_c(HEADS)
    assert not c.head_format_v and clkvq.LayerConfig.from_c(c, HEADS) == one
    plain, _ = clkvq.LayerConfig().to_c()
    assert not plain.head_format_k and clkvq.LayerConfig.from_c(plain).n_heads is None


def test_head_formats_are_checked(ctx):
    bad = [
        (dict(head_format_k="q4"), "sequence of formats"),
        (dict(head_format_k=Q4), "sequence of formats"),
        (dict(head_format_k=[]), "empty"),
        (dict(head_format_k=[Q4, "q5"]), r"head_format_k\[1\] 'q5'"),
        (dict(head_format_k=[Q4, 4]), r"head_format_k\[1\] must be a Format"),
        (dict(head_format_k=[Q4, Q2], head_format_v=[Q2]), "2 heads, head_format_v 1"),
        (dict(head_format_v=3), "sequence of formats"),
    ]
    for kw, match in bad:
        with pytest.raises(clkvq.InvalidArgumentError, match=match):
            clkvq.LayerConfig(**kw)
    lc = per_head()
    with pytest.raises(clkvq.InvalidArgumentError, match="head_format_k has 5 entries; "
                                                         "n_kv_heads = 4"):
        lc.to_c(4, DIM)
    with pytest.raises(clkvq.InvalidArgumentError, match="give n_kv_heads"):
        lc.to_c()
    with pytest.raises(clkvq.InvalidArgumentError, match="5 kv heads, not 4"):
        lc.head_pairs(4)
    c, keep = lc.to_c(HEADS)
    with pytest.raises(clkvq.InvalidArgumentError, match="head_format_k: give n_kv_heads"):
        clkvq.LayerConfig.from_c(c)
    with pytest.raises(clkvq.InvalidArgumentError, match="head_format_k has 5 entries"):
        clkvq.Cache.plan(ctx, lc, n_layers=1, capacity=64, n_kv_heads=4, head_dim=DIM)
    with pytest.raises(clkvq.InvalidArgumentError, match="give n_kv_heads"):
        clkvq.PrecisionConfig.create([lc])
    with pytest.raises(clkvq.InvalidArgumentError, match="n_kv_heads = 3"):
        clkvq.PrecisionConfig.create([lc], n_kv_heads=3)
    with pytest.raises(clkvq.InvalidArgumentError, match="defaults cannot carry head formats"):
        clkvq.PrecisionConfig.parse("0: {nbits_key: 4, nbits_value: 2}\n", defaults=lc)


def test_config_create_layer_save_load(tmp_path):
    uniform = clkvq.parse_spec("kivi:k4v2:g32:r32").config
    with clkvq.PrecisionConfig.create([per_head(), uniform], "m", n_kv_heads=HEADS) as c:
        assert c.n_heads(0) == HEADS and c.n_heads(1) == 0
        assert [c.head(0, h) for h in range(HEADS)] == list(zip(HEAD_K, HEAD_V))
        l0, l1 = c.layer(0), c.layer(1)
        assert (l0.head_format_k, l0.head_format_v) == (HEAD_K, HEAD_V)
        assert (l0.format_k, l0.format_v) == (Q4, Q2)  # the widest head
        assert l0 == per_head(format_k=Q4, format_v=Q2)
        assert l1 == uniform and l1.head_format_k is None
        assert c.average_bits == pytest.approx(((3 * 6 + 2 * 4) / 5 / 2 + 3) / 2)
        c.save(tmp_path / "h.yaml")
    # the saved file is a per-head file: its head count comes from the file
    with clkvq.PrecisionConfig.load(tmp_path / "h.yaml") as back:
        assert back.layers() == [l0, l1]


# ---------------------------------------------------------------- caches


def test_cache_with_two_shares_decodes(ctx):
    """5 kv heads, two (K, V) pairs in non-contiguous heads: decode is fp64
    attention over the read-back, and each share reads back exactly as a
    uniform cache of its heads and pair does."""
    args = dict(n_layers=1, n_seqs=2, capacity=128, n_kv_heads=HEADS, n_q_heads=HEADS * QPK,
                head_dim=DIM, **LAYOUTS)
    chunks = [(kv(11, 70), kv(12, 40)), (kv(13, 1), kv(14, 25))]  # prefill, then more
    q = queries(5, 2, HEADS * QPK, DIM)
    with clkvq.Cache(ctx, per_head(), **args) as c:
        assert c.layers[0].head_format_k == HEAD_K
        for step in chunks:
            for s, (k, v) in enumerate(step):
                c.append(0, s, k, v)
        assert [c.length(0, s) for s in range(2)] == [71, 65]
        out = c.decode(0, q, SCALE)
        for s in range(2):
            kr, vr = c.read(0, s)
            ref = attention(q[s][:, None, :], kr, vr, SCALE)[:, 0]
            assert close_to(out[s], ref), s
            # the quantized tokens are close to what went in, not exact
            k_in = np.concatenate([chunks[0][s][0], chunks[1][s][0]], axis=1)
            assert 0 < np.abs(kr - k_in).max() < 0.5 * np.abs(k_in).max()
        for (fk, fv), heads in SHARES.items():
            share = clkvq.parse_spec(f"kivi:k{fk.bits_name}v{fv.bits_name}:g32:r32").config
            with clkvq.Cache(ctx, share, **dict(args, n_kv_heads=len(heads),
                                                 n_q_heads=len(heads) * QPK)) as u:
                for step in chunks:
                    for s, (k, v) in enumerate(step):
                        u.append(0, s, C(k[heads]), C(v[heads]))
                for s in range(2):
                    kr, vr = c.read(0, s)
                    ku, vu = u.read(0, s)
                    assert np.array_equal(kr[heads], ku) and np.array_equal(vr[heads], vu)
                # its decode is the per-head cache's for the share's query heads
                qh = [h * QPK + i for h in heads for i in range(QPK)]
                assert np.abs(u.decode(0, C(q[:, qh]), SCALE) - out[:, qh]).max() < 1e-5


def test_config_with_per_head_layers_builds_a_cache(ctx):
    """YAML with per-head layers (layer 0: the two shares; layer 1: one
    pair on every head) -> Cache.from_config, whose layers carry the heads'
    formats and whose decode is attention over the read-back."""
    text = per_head_yaml(2, lambda layer: list(zip(HEAD_K, HEAD_V)) if layer == 0
                         else [(Q2, Q2)] * HEADS)
    with clkvq.PrecisionConfig.parse(text, defaults="kivi:g32:r32", ctx=ctx) as cfg:
        assert cfg.n_heads(0) == cfg.n_heads(1) == HEADS
        shape = dict(capacity=64, n_kv_heads=HEADS, n_q_heads=HEADS * QPK, head_dim=DIM,
                     **LAYOUTS)
        with clkvq.Cache.from_config(ctx, cfg, **shape) as c:
            assert c.layers[0].head_format_k == HEAD_K
            assert c.layers[1].head_pairs(HEADS) == [(Q2, Q2)] * HEADS
            q = queries(7, 1, HEADS * QPK, DIM)
            for layer in range(2):
                c.append(layer, 0, *kv(20 + layer, 50))
                kr, vr = c.read(layer, 0)
                ref = attention(q[0][:, None, :], kr, vr, SCALE)[:, 0]
                assert close_to(c.decode(layer, q, SCALE)[0], ref), layer
            assert c.memory.quantized_bytes > 0
        with pytest.raises(clkvq.InvalidArgumentError):
            clkvq.Cache.from_config(ctx, cfg, **dict(shape, n_kv_heads=1, n_q_heads=2))


def test_tune_shapes_per_share():
    text = per_head_yaml(3, lambda layer: list(zip(HEAD_K, HEAD_V)) if layer != 1
                         else [(Q4, Q2)] * HEADS)
    g = clkvq.ModelGeometry(3, HEADS * QPK, HEADS, DIM)
    with clkvq.PrecisionConfig.parse(text, defaults="kivi:g32:r32") as cfg:
        shapes, head_shape, first = cfg.tune_shapes(g, 1024, 3)
    got = [(s.format_k, s.format_v, s.n_kv_heads, s.n_q_heads) for s in shapes]
    # layer 0's shares, then layer 1's pair on all five heads (another head count)
    assert got == [(Q4, Q2, 3, 6), (Q2, Q2, 2, 4), (Q4, Q2, 5, 10)]
    assert head_shape == [[0, 1, 0, 0, 1], [2] * HEADS, [0, 1, 0, 0, 1]]
    assert first == [0, 0, 1]
    assert all((s.scheme, s.group_size, s.head_dim, s.tokens, s.batch) ==
               (clkvq.Scheme.KIVI, 32, DIM, 1024, 3) for s in shapes)


def test_eval_layer_weights_bits_by_share(ctx):
    """clkvq_eval_layer on a per-head layer: the shares' bits weighted by
    their heads; its error is that of the two pairs' heads."""
    k, v = kv(30, 80)
    q = queries(31, HEADS * QPK, 80, DIM)
    r = clkvq.eval_layer(ctx, per_head(), q, k, v, 8)
    b42 = clkvq.eval_layer(ctx, "kivi:k4v2:g32:r32", q, k, v, 8)
    b22 = clkvq.eval_layer(ctx, "kivi:k2v2:g32:r32", q, k, v, 8)
    assert r.bits_per_element == pytest.approx((3 * b42.bits_per_element +
                                                2 * b22.bits_per_element) / 5)
    assert r.bits_long == pytest.approx((3 * b42.bits_long + 2 * b22.bits_long) / 5)
    assert b42.rel_err < r.rel_err < b22.rel_err


def test_evaluate_dump_takes_per_head_configs(ctx, tiny_dump):
    """A per-head config whose heads share one pair scores exactly as the
    uniform config of that pair (the tiny dump: 2 layers x NKV heads)."""
    text = per_head_yaml(2, lambda layer: [(Q4, Q4)] * NKV)
    with clkvq.PrecisionConfig.parse(text, ctx=ctx) as heads, \
            clkvq.PrecisionConfig.create(["token:k4v4:g32"] * 2, ctx=ctx) as uniform:
        assert heads.n_heads(0) == NKV
        rows = clkvq.evaluate_dump(ctx, tiny_dump, [], [heads, uniform], n_queries=8)
    assert rows[0].as_dict() == dict(rows[1].as_dict(), scheme=rows[0].scheme)
    assert 0 < rows[0].rel_err < 1


def test_e2e_storage_averages_bits_over_heads():
    """clkvq.e2e's stored bits of a per-head layer: each head stores as many
    rows, so the mean of its heads' packed bits."""
    from clkvq.e2e import packed_bits
    lc = per_head()
    k4, k2 = (packed_bits(lc.replace(head_format_k=None, head_format_v=None, format_k=f),
                          False, DIM) for f in (Q4, Q2))
    assert k2 < k4
    assert packed_bits(lc, False, DIM) == pytest.approx((3 * k4 + 2 * k2) / 5)
    assert packed_bits(lc, True, DIM) == packed_bits(lc.replace(head_format_v=None,
                                                                format_v=Q2), True, DIM)


# ---------------------------------------------------------------- KVTuner's file


@pytest.mark.skipif(not os.path.exists(PER_HEAD_FILE),
                    reason="configs/kvtuner not found next to the tests")
def test_kvtuner_per_head_file_decodes(ctx):
    """KVTuner's per-head Llama-3-8B file (K8V4 on every head of every
    layer) at the model's geometry: a cache at small capacity decodes."""
    g = clkvq.model_lookup("llama-3-8b")
    with clkvq.PrecisionConfig.load_for_model(PER_HEAD_FILE, geometry="llama-3-8b",
                                              ctx=ctx) as cfg:
        assert cfg.n_layers == g.n_layers and cfg.n_heads(0) == g.n_kv_heads
        layers = cfg.layers()
        assert all(lc.head_pairs(g.n_kv_heads) == [(Q8, clkvq.Format.Q4)] * g.n_kv_heads
                   for lc in layers)
        shapes, head_shape, first = cfg.tune_shapes(None, 4096, 1)
        assert [(s.format_k, s.n_kv_heads, s.n_q_heads) for s in shapes] == \
            [(Q8, g.n_kv_heads, g.n_q_heads)]
        assert head_shape == [[0] * g.n_kv_heads] * g.n_layers and first == [0]
        with clkvq.Cache.from_config(ctx, cfg, capacity=48, n_kv_heads=g.n_kv_heads,
                                     n_q_heads=g.n_q_heads, head_dim=g.head_dim) as c:
            assert c.layers == layers
            scale = 1.0 / math.sqrt(g.head_dim)
            for layer in (0, g.n_layers - 1):
                k, v = clkvq.synth_kv(40 + layer, (g.n_kv_heads, 40, g.head_dim))
                c.append(layer, 0, k, v)
                q = queries(50 + layer, 1, g.n_q_heads, g.head_dim)
                kr, vr = c.read(layer, 0)
                ref = attention(q[0][:, None, :], kr, vr, scale)[:, 0]
                assert close_to(c.decode(layer, q, scale)[0], ref), layer

