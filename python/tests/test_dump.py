"""Dumps: the binding's reader and writer against the C program
tests/dump_check (which uses the same library from C)."""

import numpy as np
import pytest

import clkvq
from conftest import rng, run


def test_read_what_c_wrote(ctx, program, tmp_path):
    path, raw = str(tmp_path / "c.st"), str(tmp_path / "c.raw")
    r = run([program("tests/dump_check"), "write", path, "f16", "3", "4", "2", "24", "32", "3",
             "c-model", raw])
    assert r.returncode == 0, r.stdout
    vals = np.fromfile(raw, dtype="<f4").reshape(3, -1)
    with clkvq.Dump(ctx, path) as d:
        assert d.info == clkvq.DumpInfo(3, 4, 2, 24, 32, "c-model")
        for layer in range(3):
            got = np.concatenate([d.read(layer, w).ravel() for w in "qkv"])
            assert np.array_equal(got, vals[layer].astype(np.float16).astype(np.float32))
    data = open(path, "rb").read()
    with clkvq.Dump.from_bytes(ctx, data) as m:
        assert m.info.n_tokens == 24
        assert np.array_equal(m.read(2, "v"), clkvq.Dump(ctx, path).read(2, "v"))


@pytest.mark.parametrize("as_f16", [False, True])
def test_c_reads_what_python_wrote(ctx, program, tmp_path, as_f16):
    path, raw = str(tmp_path / "p.st"), str(tmp_path / "p.raw")
    g = rng(4)
    q = [g.standard_normal((4, 10, 32)).astype(np.float32) for _ in range(2)]
    k = [g.standard_normal((2, 10, 32)).astype(np.float32) for _ in range(2)]
    v = [g.standard_normal((2, 10, 32)).astype(np.float16) for _ in range(2)]
    clkvq.write_dump(ctx, path, q, k, v, model="py-model", as_f16=as_f16)
    r = run([program("tests/dump_check"), "read", path, raw])
    assert r.returncode == 0, r.stdout
    assert "layers=2 q_heads=4 kv_heads=2 tokens=10 head_dim=32 model=py-model" in r.stdout
    want = np.concatenate([np.concatenate([a.ravel(), b.ravel(), c.astype(np.float32).ravel()])
                           for a, b, c in zip(q, k, v)])
    if as_f16:
        want = want.astype(np.float16).astype(np.float32)
    assert np.array_equal(np.fromfile(raw, dtype="<f4"), want)


def test_bad_dumps(ctx, tmp_path):
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.Dump(ctx, tmp_path / "missing.st")
    assert e.value.status_name == "CLKVQ_ERR_IO" and "missing.st" in e.value.message
    with pytest.raises(clkvq.ClkvqError) as e:
        clkvq.Dump.from_bytes(ctx, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert e.value.status_name == "CLKVQ_ERR_CORRUPT"
    q = [np.zeros((2, 4, 32), np.float32)]
    with pytest.raises(clkvq.NonFiniteError):
        bad = np.zeros((1, 4, 32), np.float32)
        bad[0, 1, 2] = np.inf
        clkvq.write_dump(ctx, tmp_path / "x.st", q, [bad], [bad])
    with pytest.raises(clkvq.InvalidArgumentError, match="k\\[0\\] has shape"):
        clkvq.write_dump(ctx, tmp_path / "x.st", q, [np.zeros((1, 5, 32), np.float32)], q)
    assert not (tmp_path / "x.st").exists()
    with clkvq.Dump.from_bytes(ctx, open(_tiny(ctx, tmp_path), "rb").read()) as d:
        with pytest.raises(clkvq.InvalidArgumentError):
            d.read(0, "x")
        with pytest.raises(clkvq.InvalidArgumentError):
            d.read(5, "q")


def _tiny(ctx, tmp_path):
    p = str(tmp_path / "t.st")
    z = [np.ones((1, 2, 32), np.float32)]
    clkvq.write_dump(ctx, p, z, z, z)
    return p
