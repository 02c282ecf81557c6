"""Model geometry, configs per model (store, find, show), caches for a model,
tuning sources and clkvq_calibrate_layer through the binding."""

import glob
import os

import numpy as np
import pytest

import clkvq
from clkvq import Fit, ModelGeometry, TuningSource
from conftest import HD, NKV, NQ, REPO, SCHEMES

LLAMA = ModelGeometry(32, 32, 8, 128)  # meta-llama/Llama-3.1-8B's config.json


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    """A cache directory of this test's own (stored configs, tuning), whose
    programs/ is the session's: no kernel is built again."""
    base = os.environ.get("CLKVQ_CACHE_DIR")
    if base:
        os.makedirs(os.path.join(base, "programs"), exist_ok=True)
        os.symlink(os.path.join(os.path.abspath(base), "programs"), tmp_path / "programs")
    monkeypatch.setenv("CLKVQ_CACHE_DIR", str(tmp_path))  # the library reads it per call
    return tmp_path


# ---------------------------------------------------------------- geometry


def test_model_table():
    table = clkvq.models()
    assert len(table) >= 10 and table["llama-3.1-8b"] == LLAMA
    assert table["all-minilm-l6-v2"] == ModelGeometry(6, 12, 12, 32)
    for name, g in table.items():
        assert clkvq.model_lookup(name) == g and clkvq.model_canonical(name) == name
        assert g.n_q_heads % g.n_kv_heads == 0


def test_names_match_hugging_face_ids():
    for name in ("meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct",
                 "LLAMA-3.1-8B"):
        assert clkvq.model_lookup(name) == LLAMA
        assert clkvq.model_canonical(name) == "llama-3.1-8b"
    assert clkvq.model_canonical("no-such-model") is None


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(clkvq.InvalidArgumentError) as e:
        clkvq.model_lookup("no-such-model")
    assert "no-such-model" in e.value.message and "llama-3.1-8b" in e.value.message
    with pytest.raises(clkvq.InvalidArgumentError, match="non-empty string"):
        clkvq.model_lookup("")


def test_explicit_geometry():
    g = ModelGeometry.parse("q32:kv8:d128:l32")
    assert g == LLAMA and str(g) == "q32:kv8:d128:l32"
    assert ModelGeometry.parse("l2:d32:kv2:q4") == ModelGeometry(2, 4, 2, 32)  # any order
    assert clkvq.model_geometry("llama-3.1-8b") == LLAMA
    assert clkvq.model_geometry(f"q{NQ}:kv{NKV}:d{HD}:l2") == ModelGeometry(2, NQ, NKV, HD)
    for bad in ("q32:kv8:d128", "q32:kv8:d128:l32:l4", "q32:kv8:dx:l32", "q30:kv8:d128:l32"):
        with pytest.raises(clkvq.InvalidArgumentError) as e:
            ModelGeometry.parse(bad)
        assert e.value.message, bad
    with pytest.raises(clkvq.InvalidArgumentError):
        ModelGeometry(1, 2, "x", 4)


# ---------------------------------------------------------------- configs


def mixed_config(n_layers=3):
    layers = [SCHEMES[2], SCHEMES[1], SCHEMES[2]][:n_layers]
    return clkvq.PrecisionConfig.create(layers, "mixed")


def test_config_geometry(ctx, tmp_path):
    g = ModelGeometry(3, NQ, NKV, HD)
    with mixed_config() as c:
        assert c.geometry is None
        c.check_geometry(g)
        with pytest.raises(clkvq.InvalidArgumentError, match="layer"):
            c.check_geometry(ModelGeometry(4, NQ, NKV, HD))
        with pytest.raises(clkvq.InvalidArgumentError):
            c.check_geometry(ModelGeometry(3, NQ, NKV, 48))  # group 32 does not divide 48
        c.set_geometry(str(g))
        assert c.geometry == g
        with pytest.raises(clkvq.InvalidArgumentError):
            c.check_geometry(ModelGeometry(3, NQ, NKV, 64))  # it carries head_dim 32 now
        c.save(tmp_path / "g.yaml")
    with clkvq.PrecisionConfig.load(tmp_path / "g.yaml") as back:
        assert back.geometry == g


def test_tune_shapes():
    with mixed_config() as c:
        shapes, head_shape, first = c.tune_shapes(ModelGeometry(3, NQ, NKV, HD), 512, 2)
        assert head_shape == [[0] * NKV, [1] * NKV, [0] * NKV] and first == [0, 1]
        assert [(s.scheme, s.format_k, s.group_size) for s in shapes] == \
            [(clkvq.Scheme.KIVI, clkvq.Format.Q2, 32), (clkvq.Scheme.TOKEN, clkvq.Format.Q4, 32)]
        assert all((s.head_dim, s.n_q_heads, s.n_kv_heads, s.tokens, s.batch) ==
                   (HD, NQ, NKV, 512, 2) for s in shapes)
        with pytest.raises(clkvq.InvalidArgumentError, match="geometry"):
            c.tune_shapes()  # it carries none
        with pytest.raises(clkvq.InvalidArgumentError):
            c.tune_shapes(ModelGeometry(3, NQ, NKV, HD), 0)


PRESETS = sorted(glob.glob(os.path.join(REPO, "configs", "kvtuner",
                                        "Meta-Llama-3.1-8B-Instruct_kivi_*.yaml")))


@pytest.mark.skipif(not PRESETS, reason="configs/kvtuner not found next to the tests")
def test_load_for_model():
    with clkvq.PrecisionConfig.load_for_model(PRESETS[0]) as c:  # geometry from the file name
        assert c.geometry == LLAMA and c.n_layers == 32
        lc = c.layer(0)
        assert (lc.scheme, lc.group_size, lc.residual) == (clkvq.Scheme.KIVI, 32, 32)
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.PrecisionConfig.load_for_model(PRESETS[0], geometry="q4:kv2:d32:l2")


def test_store_and_find(ctx, cache_dir):
    with pytest.raises(clkvq.InvalidArgumentError, match="no-such-model"):
        clkvq.PrecisionConfig.for_model("no-such-model", ctx)
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.PrecisionConfig.for_model("gemma-2-2b", ctx)  # known: nothing stored or shipped
    assert e.value.status_name == "CLKVQ_ERR_IO"
    with clkvq.PrecisionConfig.for_model("meta-llama/Llama-3.1-8B-Instruct", ctx) as shipped:
        assert shipped.origin.startswith("shipped:") and shipped.geometry == LLAMA
    with mixed_config() as c:
        with pytest.raises(clkvq.InvalidArgumentError):
            c.store()  # "mixed" is no model of the table and it carries no geometry
        c.set_geometry(ModelGeometry(3, NQ, NKV, HD))
        path = c.store("my-org/My-Model")
    assert path == str(cache_dir / "configs" / "my-model.yaml") and os.path.isfile(path)
    with clkvq.PrecisionConfig.for_model("my-model", ctx) as found:
        assert found.origin == path and found.n_layers == 3
        assert found.layer(0) == clkvq.parse_spec(SCHEMES[2]).config
    text = clkvq.config_show(ctx)
    assert "my-model.yaml" in text and "llama-3.1-8b" in text


# ---------------------------------------------------------------- caches


def test_cache_for_a_shipped_model(ctx, cache_dir):
    with clkvq.Cache.for_model(ctx, "meta-llama/Llama-3.1-8B-Instruct", capacity=64) as c:
        assert (c.n_layers, c.n_q_heads, c.n_kv_heads, c.head_dim) == (32, 32, 8, 128)
        assert c.config_origin.startswith("shipped:") and c.layers[0].scheme == clkvq.Scheme.KIVI
        assert c.length(31, 0) == 0 and c.memory.device_bytes > 0
        for layer in (0, 31):
            assert isinstance(c.tuning_source(layer), TuningSource)
        with pytest.raises(clkvq.InvalidArgumentError):
            c.tuning_source(32)


def test_cache_for_a_stored_model(ctx, cache_dir):
    g = clkvq.model_lookup("all-MiniLM-L6-v2")
    with clkvq.PrecisionConfig.create([SCHEMES[1]] * g.n_layers, "all-MiniLM-L6-v2") as c:
        c.store()
    k, v = clkvq.synth_kv(5, (g.n_kv_heads, 20, g.head_dim))
    with clkvq.Cache.for_model(ctx, "sentence-transformers/all-MiniLM-L6-v2", capacity=32) as c, \
            clkvq.Cache(ctx, SCHEMES[1], n_layers=1, capacity=32, n_kv_heads=g.n_kv_heads,
                        head_dim=g.head_dim) as ref:
        assert c.config_origin.endswith("all-minilm-l6-v2.yaml") and c.n_layers == 6
        c.append(5, 0, k, v)
        ref.append(0, 0, k, v)
        got, want = c.read(5, 0), ref.read(0, 0)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_cache_for_model_errors(ctx, cache_dir):
    with pytest.raises(clkvq.InvalidArgumentError) as e:
        clkvq.Cache.for_model(ctx, "no-such-model", capacity=16)
    assert "llama-3.1-8b" in e.value.message  # the known models
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.Cache.for_model(ctx, "gemma-2-2b", capacity=16)
    assert e.value.status_name == "CLKVQ_ERR_IO"
    with pytest.raises(clkvq.InvalidArgumentError, match="capacity"):
        clkvq.Cache.for_model(ctx, "llama-3.1-8b", capacity="16")
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.Cache.for_model(ctx, "llama-3.1-8b", capacity=0)
    with pytest.raises(clkvq.InvalidArgumentError, match="layout"):
        clkvq.Cache.for_model(ctx, "llama-3.1-8b", capacity=16, layout_k="diagonal")


def test_tuning_source(ctx):
    for s in TuningSource:
        assert clkvq.tuning_source_name(s) == s.text
        assert clkvq.tuning_source_name(int(s)) == s.text
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.tuning_source_name(9)
    with clkvq.Cache(ctx, SCHEMES[1], n_layers=2, capacity=64, n_kv_heads=NKV, n_q_heads=NQ,
                     head_dim=HD) as c:
        found = c.tuning_source(1)
        assert found != TuningSource.CALLER
        c.tuning = clkvq.AttnTuning("cooperative", wgs=16)
        assert c.tuning_source(0) == c.tuning_source(1) == TuningSource.CALLER
        c.tuning = None
        assert c.tuning_source(1) == found


# ---------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def kv():
    return clkvq.synth_kv(11, (NKV, 96, HD))


def test_calibrate_layer_fits_what_the_spec_asks(ctx, kv):
    k, v = kv
    lc = clkvq.calibrate_layer(ctx, "skvq:k2v1.5:w16:s2:calib:perm:center", k, v)
    assert lc.group_size == HD  # skvq's group: min(128, head_dim)
    for p in (lc.perm_k, lc.perm_v):
        assert p.shape == (NKV, HD) and all(sorted(row) == list(range(HD)) for row in p)
    assert lc.mean_k.shape == lc.mean_v.shape == (NKV, HD)
    assert 0.4 <= lc.clip_k <= 1.0 and 0.4 <= lc.clip_v <= 1.0
    plain = clkvq.calibrate_layer(ctx, "token:k4v4:g32", k, v)  # nothing to fit
    assert plain == clkvq.parse_spec("token:k4v4:g32").config


def test_calibrate_layer_permutation_is_calibrate_permutation(ctx, kv):
    """Without centering or rotation the permutation is clkvq_calibrate_permutation's
    on the tokens the cache quantizes (after skvq's sinks)."""
    k, v = kv
    base = clkvq.parse_spec(SCHEMES[3]).config
    lc = clkvq.calibrate_layer(ctx, base, k, v, Fit.PERM_K)
    assert lc.perm_v is None and lc.clip_k == base.clip_k
    want = clkvq.calibrate_permutation(ctx, np.ascontiguousarray(k[:, base.n_sink:]), 32)
    assert np.array_equal(lc.perm_k, want)


def test_calibrated_clip_reconstructs_better(ctx, kv):
    """The fitted clip is the grid's least reconstruction MSE, and 1.0 is on
    the grid: the cache's read-back error cannot be larger with it."""
    k, v = kv
    fitted = clkvq.calibrate_layer(ctx, "token:k2v2:g32:calib", k, v)
    errs = []
    for lc in (clkvq.parse_spec("token:k2v2:g32").config, fitted):
        with clkvq.Cache(ctx, lc, n_layers=1, capacity=96, n_kv_heads=NKV, head_dim=HD) as c:
            c.append(0, 0, k, v)
            kb, vb = c.read(0, 0)
            errs.append((float(((kb - k) ** 2).sum()), float(((vb - v) ** 2).sum())))
    assert errs[1][0] <= errs[0][0] and errs[1][1] <= errs[0][1]
    assert fitted.clip_k < 1.0  # synth keys have outlier channels


def test_calibrate_layer_errors(ctx, kv):
    k, v = kv
    with pytest.raises(clkvq.InvalidArgumentError, match="v has shape"):
        clkvq.calibrate_layer(ctx, "token:calib", k, np.ascontiguousarray(v[:, :10]))
    with pytest.raises(clkvq.InvalidArgumentError, match="give fit"):
        clkvq.calibrate_layer(ctx, clkvq.LayerConfig.default("token"), k, v)
    with pytest.raises(clkvq.InvalidArgumentError, match="fit"):
        clkvq.calibrate_layer(ctx, "token", k, v, fit=64)
    with pytest.raises(clkvq.InvalidArgumentError, match="clip_grid"):
        clkvq.calibrate_layer(ctx, "token:calib", k, v, clip_grid=(0.5, 1.0))
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.calibrate_layer(ctx, "token:calib", k, v, clip_grid=(0.9, 0.5, 0.1))
    assert e.value.message
    with pytest.raises(clkvq.ClkvqError):
        clkvq.calibrate_layer(ctx, "token:k4v4:g48:calib", k, v)  # 48 does not divide 32
    bad = k.copy()
    bad[0, 5, 3] = np.inf
    with pytest.raises(clkvq.ClkvqError):
        clkvq.calibrate_layer(ctx, "token:calib", bad, v)
