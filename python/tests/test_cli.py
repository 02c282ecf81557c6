"""python -m clkvq and python -m clkvq.e2e as a user runs them."""

import json
import os
import subprocess
import sys

import clkvq
from conftest import run

PY = [sys.executable, "-m", "clkvq"]


def test_devices():
    r = run(PY + ["devices"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == clkvq.list_devices()


def test_info_and_tuning(ctx):
    r = run(PY + ["info"])
    assert r.returncode == 0 and ctx.device_info.device_key in r.stdout, r.stderr
    r = run(PY + ["tuning"])
    assert r.returncode == 0 and r.stdout == clkvq.tuning_show(ctx)


def test_eval_json(tiny_dump):
    r = run(PY + ["eval", "--calib", tiny_dump, "--scheme", "fp16", "--scheme",
                  "token:k4v4:g32", "--queries", "8", "--json"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [x["scheme"] for x in rows] == ["fp16", "token:k4v4:g32"]
    assert rows[0]["rel_err"] < rows[1]["rel_err"]
    r = run(PY + ["eval", "--calib", tiny_dump, "--scheme", "token:k4v4:g32", "--queries", "8"])
    assert r.returncode == 0 and "| token:k4v4:g32" in r.stdout


def test_usage_errors(tiny_dump, tmp_path):
    assert run(PY).returncode == 2
    assert run(PY + ["eval", "--calib", tiny_dump]).returncode == 2
    r = run(PY + ["eval", "--calib", tiny_dump, "--scheme", "token:k5v4"])
    assert r.returncode == 2 and "k5v4" in r.stderr
    r = run(PY + ["eval", "--calib", tiny_dump, "--scheme", "fp16", "--queries", "100000"])
    assert r.returncode == 2
    r = run(PY + ["eval", "--calib", str(tmp_path / "none.st"), "--scheme", "fp16"])
    assert r.returncode == 1 and "CLKVQ_ERR_IO" in r.stderr


def test_missing_library_is_a_clear_error(tmp_path):
    env = dict(os.environ, CLKVQ_LIBRARY=str(tmp_path / "libnothing.so"))
    r = subprocess.run(PY + ["devices"], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert "CLKVQ_LIBRARY=" in r.stderr and "could not be loaded" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import clkvq; print(clkvq.Format.Q4)"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "q4"  # import alone needs no library


def test_e2e_tiny_model(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("# test\nthe program is free software.\tthe code is free.\n"
                     "a copy of the license.\tthe terms of use.\n"
                     "it is in the work.\tthis is the source code.\n")
    out = tmp_path / "rows.json"
    r = run([sys.executable, "-m", "clkvq.e2e", "--tiny-random", "3", "--pairs", str(pairs),
             "--scheme", "fp16", "--scheme", "token:k4v4:g32", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    fp16, k2 = rows
    assert fp16["cos_mean"] > 0.99999 and fp16["packed"] == 0 and fp16["bits"] == 16
    assert k2["cos_mean"] < fp16["cos_mean"] and k2["packed"] == 1
    assert k2["bits"] == 5.0
    for row in rows:
        assert row["fused_err"] < 1e-4  # the fused decode agrees with the read-back
    assert "| `token:k4v4:g32` |" in r.stdout


def test_models_and_configs(tmp_path):
    r = run(PY + ["models"])
    assert r.returncode == 0, r.stderr
    table = dict(line.split() for line in r.stdout.splitlines())
    assert table == {name: str(g) for name, g in clkvq.models().items()}
    env = dict(os.environ, CLKVQ_CACHE_DIR=str(tmp_path))  # nothing stored there
    r = run(PY + ["configs"], env=env)
    assert r.returncode == 0 and "0 stored" in r.stdout and "llama-3.1-8b" in r.stdout, r.stderr


def test_eval_fit_out_of_sample(tiny_dump):
    r = run(PY + ["eval", "--calib", tiny_dump, "--fit", tiny_dump, "--scheme",
                  "token:k4v4:g32:calib", "--queries", "8"])
    assert r.returncode == 0, r.stderr
    assert "| out-of-sample |" in r.stdout and "out of sample" in r.stdout
    r = run(PY + ["eval", "--calib", tiny_dump, "--scheme", "token:k4v4:g32:calib", "--queries",
                  "8", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["fitted"] == "in-sample"
