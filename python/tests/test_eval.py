"""evaluate_dump and eval_layer against clkvq-eval --json on the same dump."""

import json

import numpy as np
import pytest

import clkvq
from conftest import SCHEMES, run

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
    for r in rows:
        c = c_rows[r.scheme]
        got = r.as_dict()
        assert got["in_sample"] == c["in_sample"]
        for key in ("bits_per_element", "rel_err", "cosine", "k_rel_err", "v_rel_err"):
            # clkvq-eval prints 7 significant digits
            assert got[key] == pytest.approx(c[key], rel=2e-6, abs=1e-12), (r.scheme, key)
    assert rows[0].rel_err < 1e-3 < rows[2].rel_err
    assert rows[4].in_sample and not rows[3].in_sample


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
