#!/usr/bin/env python3
"""dump_kv.py: write a clkvq calibration dump from a Hugging Face causal LM.

Runs one text through the model (use_cache=True) and saves, per layer, the
post-RoPE queries and the K/V cache exactly as the runtime caches them, in
the safetensors layout that clkvq_dump_open reads and the KVTuner layer
precision search (clkvq-tune) consumes:

    layers.<i>.q  [n_q_heads,  n_tokens, head_dim]
    layers.<i>.k  [n_kv_heads, n_tokens, head_dim]   (post-RoPE, as cached)
    layers.<i>.v  [n_kv_heads, n_tokens, head_dim]
    __metadata__  {"format": "clkvq-kv-dump", "model": ..., "notes": ...}

Usage:
    pip install torch transformers safetensors
    python3 tools/dump_kv.py --model meta-llama/Llama-3.2-1B --out llama-1b.safetensors
    python3 tools/dump_kv.py --model ./my-local-model --text-file wiki.txt \\
        --max-tokens 1024 --dtype f16 --device cuda --out dump.safetensors

Where q comes from (--q-capture):
  rope-patch (default when available): the model's own modeling module calls
      a module-level apply_rotary_pos_emb(q, k, cos, sin, ...) inside every
      attention forward (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, ...).
      The script wraps that function for the duration of the forward pass
      and records the q it returns, so every model-specific step before it
      (q_norm in Qwen3/Gemma3/OLMo2, biases, head reshapes) is the model's
      own. Call i of a forward pass is layer i.
  proj-hook: forward hooks on each attention module's q_proj (or q_norm
      when the module has one) and k_proj/k_norm take the pre-RoPE
      projections; the script then applies the model module's
      apply_rotary_pos_emb with the (cos, sin) the decoder passes to the
      attention module (position_embeddings) or, on older transformers,
      what the module's rotary_emb returns for the positions.
  Either way the script re-derives k the same way and compares it with the
  cached k of every layer; a mismatch (relative error > --check-tol) stops
  the script instead of writing queries that do not belong to the keys.

Limits (read before trusting a dump):
  - Partial-rotary models (Phi-1/2, GPT-NeoX rotary_pct < 1, ChatGLM) rotate
    only part of head_dim outside apply_rotary_pos_emb's view: the k check
    fails and the script says so. Models without a module-level
    apply_rotary_pos_emb (GPT-2, Falcon's fused path, custom remote code)
    need --q-capture proj-hook or are not supported.
  - Sliding-window / chunked-attention layers (Gemma 2/3, Mistral with a
    window, Llama 4) cache at most their window: keep --max-tokens at or
    below the smallest window or the script stops with a message.
  - q is stored as the attention kernel receives it: after RoPE, before the
    softmax scale (1/sqrt(head_dim) or a model-specific query_pre_attn
    scalar) and without logit soft-capping.
  - Batch size 1, one sequence; quantized or offloaded caches are not
    supported (the default DynamicCache is).
  - The values are stored in --dtype (default: the model's dtype, so
    nothing is rounded twice); F16 refuses values beyond +-65504.

Only --help works without torch/transformers installed; the clkvq build and
tests never import this script. Checked offline on tiny randomly initialised
Llama, Mistral, Qwen2 and Qwen3 models (both --q-capture methods: the
attention output rebuilt from the dump alone matched the model's own) and
for the refusals above on Phi (partial rotary), Gemma 2 (window) and GPT-2;
not yet on a real pretrained checkpoint.
"""

import argparse
import inspect
import os
import sys

SAMPLE_TEXT = """\
The lighthouse keeper kept two logs. In the first he wrote the weather every
four hours: wind from the south-west at force five, visibility eight miles,
a falling glass. In the second, which nobody asked him to keep, he wrote what
the sea had brought in: a green bottle with no message, a length of blue rope,
a child's shoe, once a whole wooden door that took two men to drag above the
tide line. When the inspectors came in spring they read the first log and
nodded, and never knew the second existed.

def moving_average(values, window):
    # A running sum avoids re-adding the whole window at every step.
    if window <= 0:
        raise ValueError("window must be positive")
    total, out = 0.0, []
    for i, x in enumerate(values):
        total += x
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

Quarterly results, in millions: revenue 412.7 (up 6.1 percent), operating
costs 301.2, research 58.9, net income 37.4. The board approved a dividend of
0.42 per share, payable on 15 March to holders of record on 1 March. Capital
expenditure for the year is expected between 120 and 135, most of it for the
new plant in Aarhus, which should reach full capacity in the third quarter.

Photosynthesis turns light into chemical energy in two stages. In the light
reactions, chlorophyll absorbs photons and splits water, releasing oxygen and
storing energy in ATP and NADPH. In the Calvin cycle, the enzyme RuBisCO fixes
carbon dioxide into three-carbon sugars, spending that ATP and NADPH. RuBisCO
is slow and sometimes grabs oxygen by mistake, which is why some plants in hot
climates evolved C4 and CAM pathways that concentrate carbon dioxide first.

Q: If a train leaves at 09:40 and the trip takes 2 hours 35 minutes, when does
it arrive? A: 09:40 plus 2 hours is 11:40; plus 35 minutes is 12:15.
Q: What is 17 times 23? A: 17 x 20 = 340 and 17 x 3 = 51, so 391.

Il pleuvait depuis le matin sur la ville basse. Dans la boulangerie de la rue
des Carmes, on parlait du prix de la farine et du match de dimanche, et
personne ne remarqua l'homme au manteau gris qui acheta trois croissants et
paya avec un billet de cinquante francs, une monnaie disparue depuis vingt ans.
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="dump_kv.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="Hugging Face model id or local folder (AutoModelForCausalLM)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--text-file", help="UTF-8 text to run (default: a built-in mixed sample)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="truncate the tokenized text to this many tokens (default 512)")
    p.add_argument("--dtype", choices=["auto", "f32", "f16", "bf16"], default="auto",
                   help="stored dtype (default auto: the model's own dtype)")
    p.add_argument("--torch-dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   default="auto", help="dtype to load the model in (default: its config's)")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--q-capture", choices=["auto", "rope-patch", "proj-hook"], default="auto",
                   help="how post-RoPE q is obtained (see above); auto tries rope-patch first")
    p.add_argument("--check-tol", type=float, default=1e-2,
                   help="max relative error between re-derived and cached k (default 1e-2)")
    p.add_argument("--model-name", help="name stored in __metadata__ (default: --model)")
    p.add_argument("--notes", default="", help="free text appended to __metadata__ notes")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="pass trust_remote_code=True to transformers (runs the repo's code)")
    args = p.parse_args(argv)
    if args.max_tokens <= 0:
        p.error("--max-tokens must be positive")
    return args


# ---------------------------------------------------------------- model parts

def attention_modules(model):
    """The attention module of every decoder layer, in layer order."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None and hasattr(base, "language_model"):  # multimodal wrappers
        layers = getattr(base.language_model, "layers", None)
    if layers is None:
        raise SystemExit("dump_kv: cannot find the decoder layers (model.model.layers)")
    mods = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None) \
            or getattr(layer, "attention", None)
        if attn is None:
            raise SystemExit(f"dump_kv: layer {i} has no self_attn/attn/attention module")
        mods.append(attn)
    return mods


def cache_layer_kv(pkv, i):
    """(k, v) of layer i, [batch, kv_heads, tokens, head_dim], whatever the cache API."""
    if hasattr(pkv, "layers") and not isinstance(pkv, (tuple, list)):  # transformers >= 4.56
        layer = pkv.layers[i]
        return layer.keys, layer.values
    if hasattr(pkv, "key_cache"):  # DynamicCache 4.36 .. 4.55
        return pkv.key_cache[i], pkv.value_cache[i]
    if hasattr(pkv, "to_legacy_cache"):
        return pkv.to_legacy_cache()[i]
    return pkv[i][0], pkv[i][1]  # legacy tuple of tuples


def cache_n_layers(pkv):
    if hasattr(pkv, "layers") and not isinstance(pkv, (tuple, list)):
        return len(pkv.layers)
    if hasattr(pkv, "key_cache"):
        return len(pkv.key_cache)
    return len(pkv)


def rel_err(a, b):
    a = a.float()
    b = b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# ---------------------------------------------------------------- q capture

def rope_globals(attn):
    """The globals dict the attention forward looks apply_rotary_pos_emb up
    in: that of the module where forward is defined (an inherited forward,
    e.g. Mistral reusing Llama's, lives in the parent's module), past any
    functools.wraps decorators."""
    fwd = inspect.unwrap(type(attn).forward)
    g = getattr(fwd, "__globals__", None)
    return g if g is not None and callable(g.get("apply_rotary_pos_emb")) else None


class RopePatch:
    """Wraps apply_rotary_pos_emb in the attention forward's globals and
    records the (q, k) it returns: post-RoPE, one call per layer in forward
    order."""

    def __init__(self, globals_dicts):
        self.globals_dicts = globals_dicts
        self.saved = []
        self.calls = []

    def __enter__(self):
        for g in self.globals_dicts:
            orig = g["apply_rotary_pos_emb"]
            self.saved.append((g, orig))

            def wrapper(*a, _orig=orig, **kw):
                out = _orig(*a, **kw)
                self.calls.append((out[0].detach(), out[1].detach()))
                return out

            g["apply_rotary_pos_emb"] = wrapper
        return self

    def __exit__(self, *exc):
        for g, orig in self.saved:
            g["apply_rotary_pos_emb"] = orig
        return False


class ProjHooks:
    """Hooks q/k projections (or their norms) and the attention forward's
    position inputs; applies the model module's RoPE afterwards."""

    def __init__(self, attns, head_dim):
        self.attns = attns
        self.head_dim = head_dim
        self.q, self.k, self.pos = {}, {}, {}
        self.handles = []

    def __enter__(self):
        for i, attn in enumerate(self.attns):
            qsrc = getattr(attn, "q_norm", None) or getattr(attn, "q_proj", None)
            ksrc = getattr(attn, "k_norm", None) or getattr(attn, "k_proj", None)
            if qsrc is None or ksrc is None:
                raise SystemExit(f"dump_kv: layer {i}: no q_proj/k_proj to hook "
                                 "(fused qkv projections are not supported by proj-hook)")
            self.handles.append(qsrc.register_forward_hook(
                lambda mod, inp, out, i=i: self.q.__setitem__(i, out.detach())))
            self.handles.append(ksrc.register_forward_hook(
                lambda mod, inp, out, i=i: self.k.__setitem__(i, out.detach())))
            self.handles.append(attn.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: self.pos.__setitem__(i, kwargs),
                with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def heads_first(self, x, batch, tokens):
        # [B, T, H*D] or [B, T, H, D] -> [B, H, T, D]
        return x.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)

    def rotated(self, i, model, rope, batch, tokens, hidden):
        q = self.heads_first(self.q[i], batch, tokens)
        k = self.heads_first(self.k[i], batch, tokens)
        kw = self.pos.get(i, {})
        pe = kw.get("position_embeddings")
        if pe is None:  # older transformers: the module (or model) computes cos/sin itself
            rotary = getattr(self.attns[i], "rotary_emb", None) \
                or getattr(getattr(model, "model", model), "rotary_emb", None)
            pos_ids = kw.get("position_ids")
            if rotary is None or pos_ids is None:
                raise SystemExit("dump_kv: proj-hook found neither position_embeddings nor "
                                 "rotary_emb + position_ids for this model")
            pe = rotary(hidden, pos_ids)
        cos, sin = pe
        q_rot, k_rot = rope(q, k, cos, sin)
        return q_rot, k_rot


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    # Heavy imports only now, so --help works anywhere.
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from safetensors.torch import save_file
    except ImportError as e:
        raise SystemExit(f"dump_kv: {e}; pip install torch transformers safetensors")

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    load_dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)

    text = SAMPLE_TEXT
    source = "built-in sample"
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
        source = os.path.basename(args.text_file)

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    # eager attention: the same python forward on every backend, so the
    # hooks and the RoPE patch see every layer.
    kwargs = dict(torch_dtype=load_dtype, trust_remote_code=args.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager",
                                                     **kwargs)
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model.to(device)
    model.eval()

    ids = tok(text, return_tensors="pt").input_ids[:, : args.max_tokens].to(device)
    n_tokens = ids.shape[1]
    if n_tokens < args.max_tokens:
        print(f"dump_kv: the text has only {n_tokens} tokens (asked for {args.max_tokens})",
              file=sys.stderr)

    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    n_layers = cfg.num_hidden_layers
    n_q_heads = cfg.num_attention_heads
    n_kv_heads = getattr(cfg, "num_key_value_heads", None) or n_q_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q_heads

    attns = attention_modules(model)
    if len(attns) != n_layers:
        raise SystemExit(f"dump_kv: {len(attns)} attention modules but {n_layers} layers")
    # Both methods rely on the model's own apply_rotary_pos_emb: one to
    # record its output, the other to call it.
    per_layer_globals = [rope_globals(a) for a in attns]
    if any(g is None for g in per_layer_globals):
        raise SystemExit(f"dump_kv: {type(attns[0]).__name__}.forward does not call a "
                         "module-level apply_rotary_pos_emb: this model's RoPE is not supported")
    unique_globals = []
    for g in per_layer_globals:
        if all(g is not u for u in unique_globals):
            unique_globals.append(g)
    method = "rope-patch" if args.q_capture == "auto" else args.q_capture

    with torch.no_grad():
        if method == "rope-patch":
            with RopePatch(unique_globals) as patch:
                out = model(ids, use_cache=True)
            if len(patch.calls) != n_layers:
                raise SystemExit(f"dump_kv: apply_rotary_pos_emb ran {len(patch.calls)} times "
                                 f"for {n_layers} layers; use --q-capture proj-hook")
            q_rot = [c[0] for c in patch.calls]
            k_rot = [c[1] for c in patch.calls]
        else:
            hooks = ProjHooks(attns, head_dim)
            with hooks:
                out = model(ids, use_cache=True, output_hidden_states=True)
            q_rot, k_rot = [], []
            for i in range(n_layers):
                rope = per_layer_globals[i]["apply_rotary_pos_emb"]
                qr, kr = hooks.rotated(i, model, rope, 1, n_tokens, out.hidden_states[i])
                q_rot.append(qr)
                k_rot.append(kr)

    pkv = out.past_key_values
    if cache_n_layers(pkv) != n_layers:
        raise SystemExit(f"dump_kv: the cache has {cache_n_layers(pkv)} layers, "
                         f"the config {n_layers}")

    stored = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
              "auto": None}[args.dtype]
    tensors = {}
    for i in range(n_layers):
        k, v = cache_layer_kv(pkv, i)
        q = q_rot[i]
        want_kv = (1, n_kv_heads, n_tokens, head_dim)
        if tuple(k.shape) != want_kv or tuple(v.shape) != want_kv:
            raise SystemExit(f"dump_kv: layer {i}: cached k {tuple(k.shape)} / v "
                             f"{tuple(v.shape)}, expected {want_kv} (a sliding-window layer "
                             "keeps fewer tokens: lower --max-tokens)")
        if tuple(q.shape) != (1, n_q_heads, n_tokens, head_dim):
            raise SystemExit(f"dump_kv: layer {i}: captured q {tuple(q.shape)}, expected "
                             f"{(1, n_q_heads, n_tokens, head_dim)} (partial rotary, or a "
                             "[batch, tokens, heads, dim] RoPE layout: not supported)")
        err = rel_err(k_rot[i], k)
        if not err <= args.check_tol:
            raise SystemExit(f"dump_kv: layer {i}: re-derived post-RoPE k differs from the "
                             f"cached k (relative error {err:.3g} > {args.check_tol}); the q "
                             "of this model cannot be trusted with this method")
        dt = stored or k.dtype
        for name, x in (("q", q), ("k", k), ("v", v)):
            x = x[0].to("cpu")
            if not torch.isfinite(x.float()).all():
                raise SystemExit(f"dump_kv: layers.{i}.{name} holds NaN/Inf")
            if dt == torch.float16 and x.float().abs().max().item() > 65504:
                raise SystemExit(f"dump_kv: layers.{i}.{name} exceeds the F16 range; "
                                 "use --dtype bf16 or f32")
            tensors[f"layers.{i}.{name}"] = x.to(dt).contiguous()

    notes = (f"text={source}; tokens={n_tokens}; q_capture={method}; "
             f"transformers={transformers.__version__}; torch={torch.__version__}")
    if args.notes:
        notes += "; " + args.notes
    meta = {"format": "clkvq-kv-dump", "model": args.model_name or args.model, "notes": notes}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + f".tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, args.out)  # atomic, as the C writer
    print(f"dump_kv: wrote {args.out}: {n_layers} layers, {n_q_heads} q heads, {n_kv_heads} "
          f"kv heads, {n_tokens} tokens, head_dim {head_dim}, "
          f"{str(next(iter(tensors.values())).dtype)}, q via {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
