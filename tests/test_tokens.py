"""Trainable token rows beside a LoRA/adapter delta (model/tokens.py): zero at init, the
patched forward equals the rows folded into the base, only the listed tokens move, pieces
resolve through the tokenizer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import AdapterConfig, LoraConfig, ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.data import synthetic
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.model import adapter, lora, tokens
from jaxllm.model.api import forward, init_params, trunk
from jaxllm.model.heads import token_stats

IDS = (3, 7)
KINDS = {"lora": (lora, LoraConfig(r=4, trainable_tokens=IDS)),
         "adapter": (adapter, AdapterConfig(size=8, trainable_tokens=IDS))}


def _cfg(tied=False):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                       max_seq_len=64, logits_chunk=4, tie_embeddings=tied)


def _moved(delta):
    """The delta with random token rows (and its layer factors as initialised)."""
    rows = delta["tokens"]
    keys = jax.random.split(jax.random.key(5), len(rows))
    moved = {k: 0.5 * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, sorted(rows.items()))}
    return {**delta, "tokens": moved}


TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 0, 64).at[0, 2].set(3).at[1, 5].set(7)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rows_start_at_zero_and_patching_equals_folding(kind, tied):
    module, dcfg = KINDS[kind]
    cfg = _cfg(tied)
    base = init_params(cfg, jax.random.key(0))
    delta = module.init_delta(base, dcfg, jax.random.key(2))
    assert set(delta["tokens"]) == ({"embed"} if tied else {"embed", "unembed"})
    np.testing.assert_array_equal(forward(module.attach(base, delta, dcfg), TOKENS, cfg), forward(base, TOKENS, cfg))
    delta = _moved(delta)
    params = module.attach(base, delta, dcfg)
    folded = tokens.fold(base, delta["tokens"], IDS)
    layers_only = module.attach(folded, {k: v for k, v in delta.items() if k != "tokens"},
                                dataclasses.replace(dcfg, trainable_tokens=()))
    np.testing.assert_allclose(forward(params, TOKENS, cfg), forward(layers_only, TOKENS, cfg), atol=1e-5)
    # the chunked loss path patches the same columns as the full logits
    hidden, _ = trunk(params, TOKENS, cfg)
    logp = jax.nn.log_softmax(forward(params, TOKENS, cfg))
    np.testing.assert_allclose(token_stats(params, hidden, TOKENS, cfg)["logprob"],
                               jnp.take_along_axis(logp, TOKENS[..., None], -1)[..., 0], atol=1e-5)


def test_only_the_listed_tokens_move():
    module, dcfg = KINDS["lora"]
    cfg = _cfg()
    base = init_params(cfg, jax.random.key(0))
    params = module.attach(base, _moved(module.init_delta(base, dcfg, jax.random.key(2))), dcfg)
    plain = TOKENS.at[0, 2].set(4).at[1, 5].set(9)         # no listed token in the input
    diff = np.abs(np.asarray(forward(params, plain, cfg) - forward(base, plain, cfg)))
    assert diff[..., list(IDS)].min() > 0                    # their LM-head columns moved
    assert diff[..., [i for i in range(64) if i not in IDS]].max() == 0   # no other logit did
    # with a listed token in the input, later positions see its new embedding
    diff_in = np.abs(np.asarray(forward(params, TOKENS, cfg) - forward(base, TOKENS, cfg)))
    other = [i for i in range(64) if i not in IDS]
    assert diff_in[0, 3:][..., other].max() > 1e-4 and diff_in[0, :2][..., other].max() == 0


def test_gradients_reach_the_rows_and_merge_unmerge_round_trips():
    module, dcfg = KINDS["lora"]
    cfg = _cfg()
    base = init_params(cfg, jax.random.key(0))
    delta = _moved(module.init_delta(base, dcfg, jax.random.key(2)))

    def loss(rows):
        p = module.attach(base, {**delta, "tokens": rows}, dcfg)
        return token_stats(p, trunk(p, TOKENS, cfg)[0], TOKENS, cfg)["logprob"].sum()
    grads = jax.grad(loss)(delta["tokens"])
    assert all(float(jnp.abs(g).min(axis=1).max()) > 0 for g in grads.values())
    merged = lora.merge(base, delta, dcfg)
    np.testing.assert_allclose(forward(merged, TOKENS, cfg), forward(module.attach(base, delta, dcfg), TOKENS, cfg),
                               atol=1e-5)
    back = lora.unmerge(merged, delta, dcfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(base)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_pieces_resolve_through_the_tokenizer_and_bad_entries_are_refused(tmp_path):
    paths = synthetic.prepare_default_data(str(tmp_path), train_docs=800, eval_docs=40, vocab_size=400)
    tok = load_tokenizer(paths["tokenizer"])
    ids = tokens.resolve(["<|im_start|>", "<|im_end|>", 20], tok, "lora.trainable_tokens")
    assert ids == (tok.special_ids["<|im_start|>"], tok.special_ids["<|im_end|>"], 20)
    with pytest.raises(ConfigError, match="not one token"):
        tokens.resolve(["hello world, again"], tok, "lora.trainable_tokens")
    with pytest.raises(ConfigError, match="listed twice"):
        tokens.resolve(["<|im_end|>", tok.special_ids["<|im_end|>"]], tok, "lora.trainable_tokens")
    with pytest.raises(ConfigError, match="needs the run's tokenizer"):
        tokens.resolve(["<|im_end|>"], None, "lora.trainable_tokens")
    assert tokens.resolve(["all"], tok, "lora.trainable_tokens") == tuple(range(tok.vocab_size))   # every row
    with pytest.raises(ConfigError, match="'all' needs the run's tokenizer"):
        tokens.resolve(["all"], None, "lora.trainable_tokens")
    base = init_params(_cfg(), jax.random.key(0))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        lora.init_delta(base, LoraConfig(r=4, trainable_tokens=(64,)), jax.random.key(0))
    with pytest.raises(ConfigError, match="resolved to token ids"):
        lora.init_delta(base, LoraConfig(r=4, trainable_tokens=("<|im_end|>",)), jax.random.key(0))
    delta = lora.init_delta(base, LoraConfig(r=4, trainable_tokens=(1, 2)), jax.random.key(0))
    with pytest.raises(ConfigError, match="do not fit"):
        lora.attach(base, delta, LoraConfig(r=4, trainable_tokens=(1, 2, 3)))


def test_options_of_a_delta_that_is_off_are_refused():
    import jaxllm
    with pytest.raises(ConfigError, match="lora.trainable_tokens needs lora.r > 0"):
        jaxllm.load_config(None, ["lora.trainable_tokens=[3]"])
    with pytest.raises(ConfigError, match="adapter.trainable_tokens needs adapter.size > 0"):
        jaxllm.load_config(None, ["adapter.trainable_tokens=[3]"])
    with pytest.raises(ConfigError, match="adapter.init_std is set but adapters are off"):
        jaxllm.load_config(None, ["adapter.init_std=0.1"])
    jaxllm.load_config(None, ["lora.r=4", "lora.trainable_tokens=[3]"])    # on: accepted
