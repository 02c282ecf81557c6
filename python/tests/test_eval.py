"""evaluate_dump and eval_layer against clkvq-eval --json on the same dump."""

import json

import numpy as np
import pytest

import clkvq
from conftest import HD, NKV, NQ, SCHEMES, run

# the schemes the other tests build kernels for, and calibration on the dump
SPECS = SCHEMES + [SCHEMES[3] + ":calib"]
QUERIES = 8


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "mixed.yaml"
    with clkvq.PrecisionConfig.create([SCHEMES[2], SCHEMES[1]], "mixed") as c:
        c.save(path)
    return str(path)


@pytest.fixture(scope="module")
def c_rows(program, tiny_dump, config_file):
    args = [program("clkvq-eval"), "--calib", tiny_dump, "--queries", str(QUERIES), "--json",
            "--config", config_file]
    for s in SPECS:
        args += ["--scheme", s]
    r = run(args)
    assert r.returncode == 0, r.stderr
    return {row["scheme"]: row for row in json.loads(r.stdout)["results"]}


def test_evaluate_dump_matches_clkvq_eval(ctx, tiny_dump, config_file, c_rows):
    rows = clkvq.evaluate_dump(ctx, tiny_dump, SPECS, [config_file], n_queries=QUERIES)
    assert [r.scheme for r in rows] == SPECS + ["mixed.yaml"]
    same_numbers(rows, c_rows)
    assert rows[0].rel_err < 1e-3 < rows[2].rel_err
    assert rows[4].in_sample and not rows[3].in_sample


def same_numbers(rows, c_rows):
    for r in rows:
        c = c_rows[r.scheme]
        got = r.as_dict()
        assert (got["in_sample"], got["fitted"]) == (c["in_sample"], c["fitted"]), r.scheme
        for key in ("bits_per_element", "bits_long", "rel_err", "cosine", "k_rel_err",
                    "v_rel_err"):
            # clkvq-eval prints 7 significant digits
            assert got[key] == pytest.approx(c[key], rel=2e-6, abs=1e-12), (r.scheme, key)


# What clkvq-eval gained: rotation (seed + layer), centering, fits through
# clkvq_calibrate_layer for any scheme, skvq's group from the head (32 here).
NEW_SPECS = ["skvq:k2v1.5:w16:s2:calib:perm", "token:k4v4:g32:rot5:center",
             "kivi:k2v2:g32:r32:calib:center", "skvq:k2v1.5:g32:w16:s2:rot:center:calib"]


@pytest.fixture(scope="module")
def synth_dumps(program, tmp_path_factory):
    """Two small synthetic dumps of one geometry from clkvq-synth-dump: one
    evaluated on, one to fit on (out of sample)."""
    d = tmp_path_factory.mktemp("synth")
    paths = []
    for seed in (3, 4):
        path = str(d / f"synth{seed}.safetensors")
        r = run([program("clkvq-synth-dump"), "-o", path, "--shape", f"q{NQ}:kv{NKV}:d{HD}:l2",
                 "--tokens", "96", "--seed", str(seed)])
        assert r.returncode == 0, r.stderr
        paths.append(path)
    return paths


@pytest.mark.parametrize("out_of_sample", [False, True])
def test_new_fields_match_clkvq_eval(ctx, program, synth_dumps, out_of_sample):
    calib, other = synth_dumps
    args = [program("clkvq-eval"), "--calib", calib, "--queries", str(QUERIES), "--json"]
    if out_of_sample:
        args += ["--fit", other]
    for s in NEW_SPECS:
        args += ["--scheme", s]
    r = run(args)
    assert r.returncode == 0, r.stderr
    c_rows = {row["scheme"]: row for row in json.loads(r.stdout)["results"]}
    rows = clkvq.evaluate_dump(ctx, calib, NEW_SPECS, n_queries=QUERIES,
                               fit=other if out_of_sample else None)
    assert [r.scheme for r in rows] == NEW_SPECS
    same_numbers(rows, c_rows)
    assert {r.fitted for r in rows} == {"out-of-sample" if out_of_sample else "in-sample"}


def test_evaluate_dump_refuses_what_clkvq_eval_refuses(ctx, synth_dumps):
    calib, _ = synth_dumps
    with pytest.raises(clkvq.InvalidArgumentError, match="g48"):
        clkvq.evaluate_dump(ctx, calib, ["token:g48"], n_queries=QUERIES)  # 48 does not divide 32
    with pytest.raises(clkvq.InvalidArgumentError, match="cannot fit"):
        clkvq.evaluate_dump(ctx, calib, [], [], config_defaults="token:calib")
    with pytest.raises(clkvq.InvalidArgumentError, match="n_queries"):
        clkvq.evaluate_dump(ctx, calib, ["fp16"], n_queries=97)


def test_eval_layer(ctx, tiny_dump):
    with clkvq.Dump(ctx, tiny_dump) as d:
        q, k, v = (d.read(1, w) for w in "qkv")
    r = clkvq.eval_layer(ctx, "token:k4v4:g32", q, k, v, QUERIES)
    assert r.n_queries == QUERIES and 0 < r.rel_err < 1 and 0 < r.cosine <= 1
    assert r.bits_per_element == pytest.approx(5.0)  # q4 codes + fp16 scale and zero per 32
    f16 = clkvq.eval_layer(ctx, "fp16", q.astype(np.float16), k, v, QUERIES)
    assert f16.rel_err < r.rel_err
    with pytest.raises(clkvq.InvalidArgumentError):
        clkvq.eval_layer(ctx, "token", q, k[:, :5].copy(), v, QUERIES)
    with pytest.raises(clkvq.ClkvqError):
        clkvq.eval_layer(ctx, "token", q, k, v, 10 ** 6)
