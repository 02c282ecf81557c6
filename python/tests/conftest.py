"""Fixtures for the binding's tests.

The tests need libclkvq (found as the package finds it) and, for the
comparisons with the C programs, the build tree: $CLKVQ_BUILD_DIR, else
<repo>/build. scripts/test.sh sets CLKVQ_BUILD_DIR, and then a missing
program fails the test instead of skipping it.
"""

import os
import subprocess

import numpy as np
import pytest

import clkvq

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One shape and a few schemes for every test: each distinct kernel
# configuration is a program build (seconds each on PoCL when nothing is
# cached yet), so the tests share them.
NKV, NQ, HD = 2, 4, 32
SCHEMES = ["fp16", "token:k4v4:g32", "kivi:k2v2:g32:r32", "skvq:k2v1.5:g32:w16:s2"]


def pytest_report_header(config):
    try:
        return [f"clkvq: {clkvq.__file__}", f"libclkvq: {clkvq.library_path()}",
                f"devices: {clkvq.list_devices()}"]
    except Exception as e:  # reported again, as a failure, by the tests
        return [f"libclkvq: NOT LOADED ({e})"]


@pytest.fixture(scope="session")
def ctx():
    c = clkvq.Context()
    yield c
    c.close()


@pytest.fixture(scope="session")
def build_dir():
    d = os.environ.get("CLKVQ_BUILD_DIR") or os.path.join(REPO, "build")
    return d


@pytest.fixture(scope="session")
def program(build_dir):
    """Path of a C program of the build tree (clkvq-eval, tests/dump_check, ...)."""

    def find(name):
        p = os.path.join(build_dir, name)
        if not os.access(p, os.X_OK):
            if os.environ.get("CLKVQ_BUILD_DIR"):
                pytest.fail(f"{p} is missing from CLKVQ_BUILD_DIR")
            pytest.skip(f"{p} not built (set CLKVQ_BUILD_DIR to the build tree)")
        return p

    return find


def run(args, **kw):
    """A program's CompletedProcess (text)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="session")
def tiny_dump(program, tmp_path_factory):
    """A 2-layer synthetic dump from the C writer (tests/dump_check)."""
    path = str(tmp_path_factory.mktemp("dump") / "tiny.safetensors")
    raw = path + ".raw"
    r = run([program("tests/dump_check"), "write", path, "f32", "2", str(NQ), str(NKV), "96",
             str(HD), "5", "tiny", raw])
    assert r.returncode == 0, r.stdout + r.stderr
    return path


def rng(seed=0):
    return np.random.default_rng(seed)


def attention(q, k, v, scale, causal_from=None):
    """fp64 attention of q [n_q, n_queries, d] over k, v [n_kv, n, d] (GQA);
    with causal_from = p0, query i sees tokens 0 .. p0 + i."""
    nq, m, d = q.shape
    nkv, n, _ = k.shape
    g = nq // nkv
    out = np.zeros((nq, m, d))
    for h in range(nq):
        s = q[h].astype(np.float64) @ k[h // g].astype(np.float64).T * scale
        if causal_from is not None:
            s[np.arange(n)[None, :] > (causal_from + np.arange(m))[:, None]] = -np.inf
        s = np.exp(s - s.max(1, keepdims=True))
        out[h] = (s / s.sum(1, keepdims=True)) @ v[h // g].astype(np.float64)
    return out
