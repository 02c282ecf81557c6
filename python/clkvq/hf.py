"""A Hugging Face transformers cache backed by clkvq, as transformers'
QuantizedCache is backed by quanto or HQQ::

    import clkvq.hf
    cache = clkvq.hf.Cache(model.config, "kivi:k2v2:g32:r128", capacity=4096)
    out = model.generate(input_ids, max_new_tokens=64, past_key_values=cache)
    # (transformers >= 5 names the argument cache=; past_key_values still works)

or, per layer from a KVTuner precision config (YAML; ``defaults`` fill the
fields the file leaves out)::

    cache = clkvq.hf.Cache(model.config, precision="llama3-8b.yaml", defaults="token:g32")

Every attention layer's new K/V (after RoPE, as the model caches them) are
appended to a clkvq Cache (one sequence per batch row) and the layer
attends, with the model's own attention code, over what the cache gives
back: dequantized where packed, fp16 where the scheme keeps fp16. Works
for decoder-only models whose layers are full (or sliding-window)
attention: Llama, Mistral, Qwen2/Qwen3, Phi-3 and the like. Needs the
layered Cache API of transformers (4.56 and later).

Not supported: beam search and other batch reordering of a filled cache
(NotImplementedError); a capacity beyond the one given (the cache's own
error). ``crop`` (assisted generation) truncates, and tokens the shorter
sequence keeps in fp16 come back dequantized, so the cache says it is not
croppable without a trace.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

import numpy as np

try:
    import torch
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("clkvq.hf needs torch and transformers >= 4.56 "
                      f"(pip install torch transformers): {e}") from e

from .cache import Cache as _Cache
from .config import PrecisionConfig
from .context import Context, default_context

_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _model_shape(config: Any) -> Tuple[int, int, int, int]:
    """(n_layers, n_q_heads, n_kv_heads, head_dim) of a (text) model config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_layers = config.num_hidden_layers
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    types = getattr(config, "layer_types", None)
    if types is not None:
        bad = set(types) - _SUPPORTED_LAYER_TYPES
        if bad:
            raise ValueError(f"clkvq.hf.Cache supports attention layers only; this model has "
                             f"{sorted(bad)}")
    return n_layers, n_q, n_kv, head_dim


class ClkvqLayer(CacheLayerMixin):
    """One model layer's view of the shared clkvq cache."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "Cache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._owner._ensure(key_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self._owner._ensure(key_states)
        k = key_states.detach().to(torch.float32).cpu().numpy()
        v = value_states.detach().to(torch.float32).cpu().numpy()
        for b in range(k.shape[0]):
            cache.append(self.layer_idx, b, np.ascontiguousarray(k[b]), np.ascontiguousarray(v[b]))
        self.length += k.shape[2]
        ks, vs = [], []
        for b in range(k.shape[0]):
            kb, vb = cache.read(self.layer_idx, b)
            assert kb is not None and vb is not None
            ks.append(kb)
            vs.append(vb)
        keys, values = torch.from_numpy(np.stack(ks)), torch.from_numpy(np.stack(vs))
        return (keys.to(dtype=self.dtype, device=self.device),
                values.to(dtype=self.dtype, device=self.device))

    def get_mask_sizes(self, query_length: Any) -> Tuple[int, int]:
        # transformers 5 passes the query length, 4.56-4.57 the cache positions
        n = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.length + n, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._owner.capacity

    def reset(self) -> None:
        self._owner._truncate(0)

    def crop(self, tokens_to_remove: int) -> None:
        self._owner.crop(tokens_to_remove)

    def _no_reorder(self, what: str) -> None:
        if self.length > 0:
            raise NotImplementedError(f"clkvq.hf.Cache does not support {what} of a filled "
                                      "cache (beam search)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._no_reorder("reordering")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._no_reorder("batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._no_reorder("batch selection")

    def offload(self) -> None:  # the cache lives on the clkvq device already
        pass

    def prefetch(self) -> None:
        pass


class Cache(_HFCache):
    """A transformers Cache whose layers store K/V in a clkvq Cache.

    ``scheme``: a spec (``"kivi:k2v2:g32:r128"``), a LayerConfig, or one per
    layer; or ``precision``: a KVTuner precision config (path or
    PrecisionConfig; ``defaults`` fill what a file leaves out). The clkvq
    cache is made at the first update, when the batch size is known, for
    ``capacity`` tokens per sequence (prompt and generated).
    """

    def __init__(self, config: Any, scheme: Any = None, *,
                 precision: Union[None, str, "os.PathLike[str]", PrecisionConfig] = None,
                 defaults: Any = None, capacity: int = 4096, ctx: Optional[Context] = None,
                 layout_k: Any = "auto", layout_v: Any = "auto"):
        if (scheme is None) == (precision is None):
            raise ValueError("give exactly one of scheme and precision")
        self.n_model_layers, self.n_q_heads, self.n_kv_heads, self.head_dim = \
            _model_shape(config)
        self.capacity = int(capacity)
        self._scheme, self._defaults = scheme, defaults
        self._precision = precision
        self._ctx = ctx
        self._layouts = (layout_k, layout_v)
        self._cache: Optional[_Cache] = None
        super().__init__(layers=[ClkvqLayer(self, i) for i in range(self.n_model_layers)])

    @property
    def clkvq_cache(self) -> Optional[_Cache]:
        """The clkvq Cache underneath (None before the first update)."""
        return self._cache

    def _ensure(self, key_states: torch.Tensor) -> _Cache:
        batch = int(key_states.shape[0])
        if self._cache is not None:
            if batch != self._cache.n_seqs:
                raise ValueError(f"the cache was made for batch {self._cache.n_seqs}, "
                                 f"not {batch}")
            return self._cache
        if key_states.shape[1] != self.n_kv_heads or key_states.shape[3] != self.head_dim:
            raise ValueError(f"key states {tuple(key_states.shape)} do not match the config's "
                             f"{self.n_kv_heads} kv heads x {self.head_dim}")
        ctx = self._ctx or default_context()
        shape = dict(n_seqs=batch, capacity=self.capacity, n_kv_heads=self.n_kv_heads,
                     n_q_heads=self.n_q_heads, head_dim=self.head_dim,
                     layout_k=self._layouts[0], layout_v=self._layouts[1])
        if self._precision is not None:
            pc = self._precision
            owned = None
            if not isinstance(pc, PrecisionConfig):
                pc = owned = PrecisionConfig.load(pc, self._defaults, ctx)
            try:
                pc.check_model(self.n_model_layers)
                self._cache = _Cache.from_config(ctx, pc, **shape)
            finally:
                if owned is not None:
                    owned.close()
        else:
            self._cache = _Cache(ctx, self._scheme, n_layers=None if isinstance(
                self._scheme, (list, tuple)) else self.n_model_layers, **shape)
        return self._cache

    def _truncate(self, n: int) -> None:
        if self._cache is not None:
            for s in range(self._cache.n_seqs):
                self._cache.truncate(s, n)
        for layer in self.layers:
            layer.length = n  # type: ignore[attr-defined]

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last tokens (negative: that many; else: keep that many,
        transformers' legacy meaning)."""
        length = self.get_seq_length()
        keep = length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove,
                                                                          length)
        self._truncate(max(0, keep))

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __repr__(self) -> str:
        what = self._scheme if self._precision is None else f"precision={self._precision}"
        return f"clkvq.hf.Cache({what}, {self.n_model_layers} layers, capacity {self.capacity})"


__all__ = ["Cache", "ClkvqLayer"]
