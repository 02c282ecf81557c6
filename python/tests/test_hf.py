"""clkvq.hf.Cache in transformers' generate, on a tiny randomly initialised
Llama built from a config (no download). Runs where torch and transformers
are importable, and is skipped with the reason printed otherwise (CI has
neither: torch is several GB).

Tolerances, from the run recorded in python/README.md: the fp16 scheme
gives the default cache's tokens, and logits within 0.05 (K/V rounded to
fp16 in an fp32 model); k8v8 gives the same tokens here and logits within
0.1 of the logits' standard deviation.
"""

import inspect
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (too big for CI)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
import clkvq  # noqa: E402

try:
    import clkvq.hf  # noqa: E402
except ImportError as e:  # an older transformers without the layered Cache API
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        initializer_range=0.1, pad_token_id=0, eos_token_id=95, bos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def cache_kwarg(model):
    """transformers 5 names generate's cache argument `cache` (past_key_values
    still works there, deprecated); earlier versions past_key_values."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(model, cache=None, kwarg=None):
    torch.manual_seed(1)
    ids = torch.randint(2, 95, (2, 12))
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True,
              return_dict_in_generate=True, attention_mask=torch.ones_like(ids))
    if cache is not None:
        kw[kwarg or cache_kwarg(model)] = cache
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return out.sequences, torch.stack(out.logits).float()


def test_fp16_gives_the_default_tokens(model):
    ref_tokens, ref_logits = generate(model)
    cache = clkvq.hf.Cache(model.config, "fp16", capacity=64)
    with warnings.catch_warnings():  # the name transformers 4 used; deprecated in transformers 5
        warnings.simplefilter("ignore", FutureWarning)
        tokens, logits = generate(model, cache, "past_key_values")
    assert torch.equal(tokens, ref_tokens)
    assert float((logits - ref_logits).abs().max()) < 0.05
    assert cache.get_seq_length() == 12 + 16 - 1 and cache.clkvq_cache.n_seqs == 2


def test_k8v8_logits_within_tolerance(model):
    ref_tokens, ref_logits = generate(model)
    tokens, logits = generate(model, clkvq.hf.Cache(model.config, "token:k8v8:g32",
                                                     capacity=64))
    assert torch.equal(tokens, ref_tokens)
    assert float((logits - ref_logits).abs().max()) < 0.1 * float(ref_logits.std())


def test_per_layer_precision_from_a_kvtuner_config(model, tmp_path):
    path = tmp_path / "tiny.yaml"
    with clkvq.PrecisionConfig.create(["token:k8v8:g32", "token:k4v2:g32"], "tiny") as c:
        c.save(path)
    cache = clkvq.hf.Cache(model.config, precision=str(path), defaults="token:g32", capacity=64)
    tokens, logits = generate(model, cache)
    layers = cache.clkvq_cache.layers
    assert [(x.format_k.text, x.format_v.text) for x in layers] == [("q8", "q8"), ("q4", "q2")]
    assert tokens.shape == (2, 28) and torch.isfinite(logits).all()
    with pytest.raises(clkvq.ClkvqError):  # 2 layers in the model, 3 in the file
        with clkvq.PrecisionConfig.create(["token"] * 3) as c3:
            c3.save(tmp_path / "three.yaml")
        generate(model, clkvq.hf.Cache(model.config, precision=str(tmp_path / "three.yaml"),
                                       capacity=64))


def test_crop_reset_and_limits(model):
    cache = clkvq.hf.Cache(model.config, "token:k4v4:g32", capacity=64)
    generate(model, cache)
    cache.crop(-5)
    assert cache.get_seq_length() == 22 and cache.clkvq_cache.length(1, 1) == 22
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([1, 0]))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.clkvq_cache.length(0, 0) == 0
    small = clkvq.hf.Cache(model.config, "token:k4v4:g32", capacity=16)
    with pytest.raises(clkvq.InvalidArgumentError, match="capacity"):
        generate(model, small)
    with pytest.raises(ValueError):
        clkvq.hf.Cache(model.config)
