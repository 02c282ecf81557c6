#!/usr/bin/env python3
"""tools/dump_minilm.py without the real weights: its tiny random BERT mode.

    python3 tests/test_dump_minilm.py BUILD/tests/dump_check

1. The tokenizer: BERT basic tokenization (lower-case, accents, punctuation,
   CJK, control characters) and greedy longest-match-first WordPiece, on
   cases with known answers.
2. `dump_minilm.py --tiny-random SEED` writes a dump that our C reader
   (dump_check read) opens with the promised shape and metadata, holding
   bit for bit what safetensors stored.
3. The dump's layer-0 q/k/v are the model's: re-derived here, independently
   of the script's forward pass, from the tiny model's weights (embeddings,
   LayerNorm, projections with biases, heads split as [head][token][dim]).
   Later layers: the attention the script computes is softmax(q k^T /
   sqrt(d)) v of the dumped tensors, bidirectional (checked through layer
   1's input: a causal mask would give other keys for every token but the
   last, and the same for the last).
4. The same seed gives the same bytes; another seed other values.

Needs numpy and safetensors; without them exits 77 (ctest's skip code),
except under CI=true, where a missing package is a failure.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "tools", "dump_minilm.py")
PASSED, FAILED = [], []


def report(name, ok, why=""):
    (PASSED if ok else FAILED).append(name)
    print(f"PASS {name}" if ok else f"FAIL {name}: {why}")


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    dump_check = os.path.abspath(sys.argv[1])
    try:
        import numpy as np
        from safetensors.numpy import load_file
    except ImportError as e:
        if os.environ.get("CI", "") not in ("", "0", "false"):
            print(f"FAIL imports: {e} (CI installs numpy and safetensors)")
            print("0 passed, 1 failed")
            return 1
        print(f"SKIP: {e}; pip install numpy safetensors to run this test")
        return 77
    sys.path.insert(0, os.path.dirname(TOOL))
    import dump_minilm as dm

    # ---- 1. tokenizer
    cases = [
        ("Héllo, WORLD!", ["hello", ",", "world", "!"]),
        ("don't  stop\tnow\n", ["don", "'", "t", "stop", "now"]),
        ("a$b^c`d", ["a", "$", "b", "^", "c", "`", "d"]),  # ASCII non-letters split
        ("x\u0000y\u200bz", ["xyz"]),                      # NUL and Cf dropped
        ("日本", ["日", "本"]),                              # CJK split per character
        ("Ça\u00a0va", ["ca", "va"]),                        # NBSP is whitespace
    ]
    for text, want in cases:
        got = dm.basic_tokenize(text)
        report(f"basic_tokenize {text!r}", got == want, f"{got} != {want}")
    vocab = {w: i for i, w in enumerate(["[UNK]", "un", "##aff", "##able", "##a", "aff",
                                         "##ffable"])}
    for word, want in [("unaffable", ["un", "##aff", "##able"]),  # longest match first
                       ("unaffablex", ["[UNK]"]),                 # any miss: whole word UNK
                       ("aff", ["aff"]), ("a" * 101, ["[UNK]"])]:
        got = dm.wordpiece(word, vocab)
        report(f"wordpiece {word[:12]!r}", got == want, f"{got} != {want}")

    with tempfile.TemporaryDirectory(prefix="clkvq-minilm-") as tmp:
        def run(seed, tokens, name):
            path = os.path.join(tmp, name)
            r = subprocess.run([sys.executable, TOOL, "--tiny-random", str(seed), "--max-tokens",
                                str(tokens), "--out", path], capture_output=True, text=True)
            return path, r

        # ---- 2. the C reader opens it
        T = 67
        path, r = run(3, T, "a.safetensors")
        report("tiny-random dump written", r.returncode == 0 and os.path.isfile(path),
               r.stdout + r.stderr)
        if r.returncode != 0:
            return finish()
        raw = os.path.join(tmp, "a.raw")
        c = subprocess.run([dump_check, "read", path, raw], capture_output=True, text=True)
        line = c.stdout.strip().splitlines()[0] if c.stdout.strip() else c.stderr
        want = (f"info layers=2 q_heads=2 kv_heads=2 tokens={T} head_dim=32 "
                f"model=tiny-random-bert-seed3")
        report("C reader: shape and model name", c.returncode == 0 and line == want,
               f"{line!r} != {want!r}")
        t = load_file(path)
        flat = np.concatenate([t[f"layers.{i}.{w}"].ravel() for i in range(2) for w in "qkv"])
        got = np.fromfile(raw, dtype="<f4") if c.returncode == 0 else np.zeros(0, np.float32)
        report("C reader: values bit for bit", got.shape == flat.shape and
               np.array_equal(got.view("<u4"), flat.astype("<f4").view("<u4")),
               f"{got.shape} vs {flat.shape}")
        report("dtypes F32, shapes [heads][tokens][head_dim]",
               all(x.dtype == np.float32 and x.shape == (2, T, 32) for x in t.values())
               and len(t) == 6, str({k: (x.dtype, x.shape) for k, x in t.items()}))

        # ---- 3. layer 0 re-derived from the weights
        model, tv = dm.tiny_random_model(3)
        w = model.w
        rng = np.random.default_rng(3)
        words = [x for x in dm.TINY_VOCAB[5:] if not x.startswith("##")]
        text = " ".join(rng.choice(words, size=4 * T))
        ids = dm.encode(text, tv, T)
        report("[CLS] ... [SEP], truncated to --max-tokens",
               len(ids) == T and ids[0] == tv["[CLS]"] and ids[-1] == tv["[SEP]"], str(ids[:3]))
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][0])
        mu = x.mean(1, keepdims=True)
        sd = np.sqrt(x.var(1, keepdims=True) + 1e-12)
        x = (x - mu) / sd * w["embeddings.LayerNorm.weight"] + w["embeddings.LayerNorm.bias"]
        for n, key in (("q", "query"), ("k", "key"), ("v", "value")):
            y = x @ w[f"encoder.layer.0.attention.self.{key}.weight"].T \
                + w[f"encoder.layer.0.attention.self.{key}.bias"]
            y = y.reshape(T, 2, 32).transpose(1, 0, 2)
            err = np.abs(y - t[f"layers.0.{n}"]).max() / np.abs(y).max()
            report(f"layer 0 {n} = LN(embeddings) W^T + b, per head", err < 1e-6, f"err {err:.3g}")
        # layer 1's input from the dumped layer-0 tensors, then its k
        q0, k0, v0 = (t[f"layers.0.{n}"].astype(np.float64) for n in "qkv")

        def attention(causal):
            s = q0 @ k0.transpose(0, 2, 1) / np.sqrt(32.0)
            if causal:
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            return (s @ v0).transpose(1, 0, 2).reshape(T, 64)

        def ln(z, name):
            m = z.mean(1, keepdims=True)
            return (z - m) / np.sqrt(z.var(1, keepdims=True) + 1e-12) * w[name + ".weight"] \
                + w[name + ".bias"]

        def lin(z, name):
            return z @ w[name + ".weight"].T + w[name + ".bias"]

        import math
        erf = np.vectorize(math.erf)
        p = "encoder.layer.0."

        def layer1_k(ctx):
            h = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            f = lin(h, p + "intermediate.dense")
            h = ln(h + lin(0.5 * f * (1 + erf(f / math.sqrt(2))), p + "output.dense"),
                   p + "output.LayerNorm")
            return lin(h, "encoder.layer.1.attention.self.key").reshape(T, 2, 32).transpose(1, 0, 2)

        k1 = layer1_k(attention(causal=False))
        err = np.abs(k1 - t["layers.1.k"]).max() / np.abs(k1).max()
        report("layer 1 k from the dumped layer 0 (bidirectional attention, GELU, LayerNorm)",
               err < 1e-5, f"err {err:.3g}")
        # the check tells the two apart: a causal layer 0 gives other keys
        # (every token but the last would see less), so a dump made with a
        # decoder's mask would fail above
        k1c = layer1_k(attention(causal=True))
        errc = np.abs(k1c - t["layers.1.k"])[:, :-1].max() / np.abs(k1).max()
        report("layer 1 k is not what a causal layer 0 gives (the dump is bidirectional)",
               errc > 1e-3, f"causal err {errc:.3g}")
        # and the last token's keys, which see every token either way, agree
        errl = np.abs(k1c - t["layers.1.k"])[:, -1].max() / np.abs(k1).max()
        report("the last token's layer-1 k is the same under either mask", errl < 1e-5,
               f"err {errl:.3g}")

        # ---- 4. determinism
        path_b, _ = run(3, T, "b.safetensors")
        path_c, _ = run(4, T, "c.safetensors")
        tb, tc = load_file(path_b), load_file(path_c)
        report("same seed, same tensors", all(np.array_equal(t[k], tb[k]) for k in t))
        report("another seed, other tensors", not np.array_equal(t["layers.0.k"], tc["layers.0.k"]))

        # bad arguments are refused with a message, nothing written
        r = subprocess.run([sys.executable, TOOL, "--tiny-random", "1", "--max-tokens", "1",
                            "--out", os.path.join(tmp, "bad.safetensors")],
                           capture_output=True, text=True)
        report("--max-tokens 1 refused", r.returncode == 2 and "max-tokens" in r.stderr and
               not os.path.exists(os.path.join(tmp, "bad.safetensors")), r.stderr)
        r = subprocess.run([sys.executable, TOOL, "--tiny-random", "1", "--max-tokens", "513",
                            "--out", os.path.join(tmp, "long.safetensors")],
                           capture_output=True, text=True)
        report("more tokens than positions refused", r.returncode != 0 and "positions" in
               r.stderr and not os.path.exists(os.path.join(tmp, "long.safetensors")), r.stderr)
    return finish()


def finish():
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
