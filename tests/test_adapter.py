"""Bottleneck adapters after the attention and MLP sublayers of every layer.

Training through the one step (the frozen base is untouched, only the adapters change and
carry optimizer state) and the sharded-equals-single-device check are in test_lora.py,
parametrized over both kinds of delta.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import AdapterConfig, ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.model import adapter
from jaxllm.objectives.policy import reference_params

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
ACFG = AdapterConfig(size=8)
forward = jax.jit(jaxllm.forward, static_argnums=2)


@pytest.fixture(scope="module")
def base():
    return jax.jit(jaxllm.init_params, static_argnums=0)(CFG, jax.random.key(0))


def tokens(b=2, t=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_fresh_adapters_are_the_base_model_exactly(base):
    delta = adapter.init_delta(base, ACFG, jax.random.key(1))
    L, d, s = 2, 64, 8
    for site in ("after_attn", "after_mlp"):
        p = delta["layers"][site]
        chex.assert_shape([p["down"]["kernel"], p["down"]["bias"], p["up"]["kernel"], p["up"]["bias"]],
                          [(L, d, s), (L, s), (L, s, d), (L, d)])
        assert float(jnp.abs(p["down"]["kernel"]).max()) > 0 and not np.any(p["up"]["kernel"])
    x = tokens()
    np.testing.assert_array_equal(forward(adapter.attach(base, delta, ACFG), x, CFG), forward(base, x, CFG))


def _cancelling(base, site: str) -> dict:
    """An adapter with up(relu(down h)) = -h at `site` (size 2d: down = [I, -I], up = [-I; I]),
    so that sublayer's output is cancelled exactly; the other site is a no-op."""
    n, d = CFG.n_layers, CFG.d_model
    cfg = AdapterConfig(size=2 * d, activation="relu")
    delta = adapter.init_delta(base, cfg, jax.random.key(1))
    eye = jnp.eye(d)
    delta["layers"][site]["down"]["kernel"] = jnp.broadcast_to(jnp.concatenate([eye, -eye], 1), (n, d, 2 * d))
    delta["layers"][site]["up"]["kernel"] = jnp.broadcast_to(jnp.concatenate([-eye, eye], 0), (n, 2 * d, d))
    return adapter.attach(base, delta, cfg)


@pytest.mark.parametrize("site,kernel", [("after_attn", ("attn", "o")), ("after_mlp", ("mlp", "down"))])
def test_adapter_sits_on_the_sublayer_output_before_the_residual(base, site, kernel):
    # h + adapter(h) = 0 at that site equals the base with that sublayer's output projection zeroed
    zeroed = jax.tree.map(lambda x: x, base)
    sub, proj = kernel
    zeroed["layers"][sub][proj]["kernel"] = jnp.zeros_like(base["layers"][sub][proj]["kernel"])
    x = tokens()
    out = forward(_cancelling(base, site), x, CFG)
    np.testing.assert_allclose(out, forward(zeroed, x, CFG), atol=1e-5, rtol=1e-5)
    assert np.abs(out - forward(base, x, CFG)).max() > 0.01


def test_logical_axes_match_the_delta(base):
    specs = adapter.delta_logical_axes(CFG, ACFG)
    delta = adapter.init_delta(base, ACFG, jax.random.key(1))
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(delta)
    for spec, x in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(delta)):
        assert len(spec) == x.ndim and spec[0] == "layers"
    assert specs["layers"]["after_mlp"]["down"]["kernel"] == \
        jax.sharding.PartitionSpec("layers", "embed", "adapter")


def test_bad_adapter_input_is_refused(base):
    with pytest.raises(ConfigError, match=r"adapter.size=0: adapters need a bottleneck width >= 1"):
        adapter.init_delta(base, AdapterConfig(size=0), jax.random.key(0))
    with pytest.raises(ConfigError, match=r"adapter.size=0"):
        adapter.make_merge(AdapterConfig(size=0))
    delta = adapter.init_delta(base, ACFG, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"adapter.size=16: .*\(2, 64, 8\) \(expected \(2, 64, 16\)\)"):
        adapter.attach(base, delta, AdapterConfig(size=16))


def test_down_projection_init_has_the_configured_std(base):
    for std in (1e-2, 0.125):
        delta = adapter.init_delta(base, AdapterConfig(size=32, init_std=std), jax.random.key(0))
        down = np.asarray(delta["layers"]["after_mlp"]["down"]["kernel"], np.float64)
        np.testing.assert_allclose(down.std(), std, rtol=0.1)
        assert not np.any(np.asarray(delta["layers"]["after_mlp"]["up"]["kernel"]))
    with pytest.raises(ConfigError, match="init_std"):
        AdapterConfig(size=8, init_std=0.0)


def _additive_part(base, mcfg, cfg, part: str, std: float, expected) -> dict:
    """The delta's `part` (zero-initialised, added to base leaves when attached): fresh, the model
    is the base exactly; randomised (std), it equals expected(base, delta[part]) run as a plain
    base, differs from the base, its reference policy (RL, DPO) is the base, and the frozen base is
    not written. Returns the randomised delta."""
    delta = adapter.init_delta(base, cfg, jax.random.key(1))
    x = tokens()
    np.testing.assert_array_equal(forward(adapter.attach(base, delta, cfg), x, mcfg), forward(base, x, mcfg))
    before = jax.tree.map(np.asarray, base)
    k = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(delta[part]))))
    delta[part] = jax.tree.map(lambda a: std * jax.random.normal(next(k), a.shape), delta[part])
    out = forward(adapter.attach(base, delta, cfg), x, mcfg)
    np.testing.assert_allclose(out, forward(expected(jax.tree.map(lambda a: a, base), delta[part]), x, mcfg),
                               atol=1e-6, rtol=1e-6)
    assert np.abs(out - forward(base, x, mcfg)).max() > 0.01
    # the reference policy (RL's KL, DPO's implicit reward) is the base, not base + delta[part]
    np.testing.assert_array_equal(forward(reference_params(adapter.attach(base, delta, cfg)), x, mcfg),
                                  forward(base, x, mcfg))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, base), before)
    return delta


def test_trained_norms_start_at_the_base_and_add_to_its_scales(base):
    """adapter.train_norms (Houlsby's trained layer norms): a zero delta on every RMSNorm scale;
    attached, the model is the base with scale + delta, and the frozen base is not written."""
    cfg = AdapterConfig(size=8, train_norms=True)
    fresh = adapter.init_delta(base, cfg, jax.random.key(1))["norms"]
    chex.assert_shape([fresh["attn_norm"], fresh["mlp_norm"], fresh["final_norm"]], [(2, 64), (2, 64), (64,)])

    def scaled(p, norms):
        for name in ("attn_norm", "mlp_norm"):
            p["layers"][name]["scale"] = p["layers"][name]["scale"] + norms[name]
        p["final_norm"]["scale"] = p["final_norm"]["scale"] + norms["final_norm"]
        return p
    delta = _additive_part(base, CFG, cfg, "norms", 0.3, scaled)
    specs = adapter.delta_logical_axes(CFG, cfg)["norms"]
    assert specs == {"attn_norm": jax.sharding.PartitionSpec("layers", "norm"),
                     "mlp_norm": jax.sharding.PartitionSpec("layers", "norm"),
                     "final_norm": jax.sharding.PartitionSpec("norm")}
    # a delta saved without the norms does not fit a config that trains them (and vice versa)
    plain = adapter.init_delta(base, ACFG, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"\['norms'\]\['final_norm'\]: None \(expected \(64,\)\)"):
        adapter.attach(base, plain, cfg)
    with pytest.raises(ConfigError, match=r"\['norms'\]\['attn_norm'\]: \(2, 64\) \(expected None\)"):
        adapter.attach(base, delta, ACFG)


@pytest.mark.parametrize("tied", [False, True])
def test_trained_embeddings_start_at_the_base_and_add_to_its_tables(tied):
    """adapter.train_embeddings (Houlsby's trained top layer; for an LM the embedding tables): a
    zero delta on the whole input embedding and LM head; attached, the model is the base with
    E + dE and W + dW, and the frozen base is not written."""
    mcfg = dataclasses.replace(CFG, tie_embeddings=tied)
    base = jax.jit(jaxllm.init_params, static_argnums=0)(mcfg, jax.random.key(0))
    cfg = AdapterConfig(size=8, train_embeddings=True)
    fresh = adapter.init_delta(base, cfg, jax.random.key(1))["embeddings"]
    assert {k: v.shape for k, v in fresh.items()} == {"embed": (128, 64), **({} if tied else {"lm_head": (64, 128)})}

    def moved(p, tables):
        p["embed"]["embedding"] = p["embed"]["embedding"] + tables["embed"]
        if not tied:
            p["lm_head"]["kernel"] = p["lm_head"]["kernel"] + tables["lm_head"]
        return p
    _additive_part(base, mcfg, cfg, "embeddings", 0.05, moved)
    specs = adapter.delta_logical_axes(mcfg, cfg)["embeddings"]
    assert specs == {"embed": jax.sharding.PartitionSpec("vocab", "embed"),
                     **({} if tied else {"lm_head": jax.sharding.PartitionSpec("embed", "vocab")})}
    plain = adapter.init_delta(base, ACFG, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"\['embeddings'\]\['embed'\]: None \(expected \(128, 64\)\)"):
        adapter.attach(base, plain, cfg)
    with pytest.raises(ConfigError, match=r"trainable_tokens with adapter.train_embeddings.*drop"):
        AdapterConfig(size=8, train_embeddings=True, trainable_tokens=(3,))


@pytest.mark.parametrize("placement", ["serial", "parallel"])
def test_placement_reads_the_sublayer_output_or_its_normed_input(base, placement):
    """One layer through Block, only the MLP site adapted with random down/up and scale 2,
    a(v) = 2 * up(gelu(down(v))) with biases; computed here by hand, with h the MLP's normed input:
    serial (Houlsby) x1 + MLP(h) + a(MLP(h)); parallel (He et al. 2022) x1 + MLP(h) + a(h)."""
    from jaxllm.model.transformer import MLP, AdapterOptions, Block, rms_norm
    p = jax.tree.map(lambda a: a[0], base["layers"])                        # layer 0's params
    cfg = AdapterConfig(size=8, placement=placement, scale=2.0)
    delta = adapter.init_delta(base, cfg, jax.random.key(1))["layers"]
    k = iter(jax.random.split(jax.random.key(3), 4))
    normal = lambda scale, shape: scale * jax.random.normal(next(k), shape)  # noqa: E731
    site = {"down": {"kernel": normal(0.2, (64, 8)), "bias": normal(0.1, (8,))},
            "up": {"kernel": normal(0.2, (8, 64)), "bias": normal(0.1, (64,))}}
    ad = {"after_attn": jax.tree.map(lambda a: a[0], delta["after_attn"]), "after_mlp": site}
    x = jax.random.normal(jax.random.key(4), (2, 12, 64))
    pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
    y_base, _ = Block(CFG).apply({"params": p}, x, pos, seg)
    no_mlp = {**p, "mlp": {**p["mlp"], "down": {"kernel": jnp.zeros_like(p["mlp"]["down"]["kernel"])}}}
    x1, _ = Block(CFG).apply({"params": no_mlp}, x, pos, seg)               # x + attention
    h = rms_norm(x1, p["mlp_norm"]["scale"], CFG.norm_eps)

    def a(v):
        return 2.0 * (jax.nn.gelu(v @ site["down"]["kernel"] + site["down"]["bias"], approximate=False)
                      @ site["up"]["kernel"] + site["up"]["bias"])
    np.testing.assert_allclose(MLP(CFG).apply({"params": p["mlp"]}, h), y_base - x1, atol=1e-5)
    want = {"serial": y_base + a(y_base - x1), "parallel": y_base + a(h)}[placement]
    opts = AdapterOptions(cfg.activation, placement, 2.0)
    got, _ = Block(CFG, adapter=opts).apply({"params": p, "adapter": ad}, x, pos, seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(got - y_base).max() > 0.01     # the adapter is not a no-op
    # the whole model: fresh adapters of either placement are the base exactly
    fresh = adapter.init_delta(base, cfg, jax.random.key(1))
    np.testing.assert_array_equal(forward(adapter.attach(base, fresh, cfg), tokens(), CFG),
                                  forward(base, tokens(), CFG))
    with pytest.raises(ConfigError, match=r"adapter.placement='before'"):
        AdapterConfig(size=8, placement="before")
    with pytest.raises(ConfigError, match="adapter.scale must be > 0"):
        AdapterConfig(size=8, scale=0.0)
