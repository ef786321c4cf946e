"""LoRA deltas applied inside the layers, trained by the one train step with a frozen base.

The training and sharding tests are parametrized over both kinds of delta (LoRA and
bottleneck adapters): the recipe drives them through the same calls.
"""
import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import AdapterConfig, LoraConfig, MeshConfig, ModelConfig, OptimConfig
from jaxllm.configlib import ConfigError
from jaxllm.data.tokens import synthetic_row
from jaxllm.model import adapter, lora
from jaxllm.model.api import param_logical_axes, param_shapes
from jaxllm.objectives import make_clm_loss
from jaxllm.parallel import rules as R
from jaxllm.training.optim import make_optimizer
from jaxllm.training.setup import make_state, plan_state
from jaxllm.training.step import make_train_step

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
LCFG = LoraConfig(r=4, alpha=8.0)
KINDS = {"lora": (lora, LCFG), "adapter": (adapter, AdapterConfig(size=8, train_norms=True,
                                                                        train_embeddings=True))}
forward = jax.jit(jaxllm.forward, static_argnums=2)
trunk = jax.jit(jaxllm.trunk, static_argnums=2)
init_params = jax.jit(jaxllm.init_params, static_argnums=0)
init_lora = jax.jit(lora.init_delta, static_argnums=1)


@pytest.fixture(scope="module")
def base():
    return init_params(CFG, jax.random.key(0))


def tokens(b=2, t=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def randomised(delta, seed=3, std=0.1):
    """Every factor replaced by std * N(0, 1) (B included, so the delta matters)."""
    leaves, tree = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


# ---------------------------------------------------------------------------- the function
@pytest.mark.parametrize("init", ["gaussian", "peft"])
def test_fresh_lora_is_the_base_model_exactly(base, init):
    cfg = LoraConfig(r=4, init=init)
    delta = init_lora(base, cfg, jax.random.key(1))
    assert all(float(jnp.abs(f["a"]).max()) > 0 for f in _factors(delta))   # A random, B zero
    x = tokens()
    np.testing.assert_array_equal(forward(lora.attach(base, delta, cfg), x, CFG),
                                  forward(base, x, CFG))


def _factors(delta):
    return [lora.get_path(delta, p) for p in lora.delta_paths(delta)]


def test_default_targets_and_factor_shapes(base):
    delta = init_lora(base, LCFG, jax.random.key(1))
    assert lora.delta_paths(delta) == sorted(lora.KERNEL_INPUT_DIMS)
    L, d, n, k, h, f = 2, 64, 4, 2, 16, 128
    q, o, down = (lora.get_path(delta, f"layers/{m}/kernel") for m in ("attn/q", "attn/o", "mlp/down"))
    chex.assert_shape([q["a"], q["b"]], [(L, d, 4), (L, 4, n, h)])
    chex.assert_shape([o["a"], o["b"]], [(L, n, h, 4), (L, 4, d)])      # o: two input dims
    chex.assert_shape([down["a"], down["b"]], [(L, f, 4), (L, 4, d)])
    kk = lora.get_path(delta, "layers/attn/k/kernel")
    chex.assert_shape(kk["b"], (L, 4, k, h))
    specs = lora.delta_logical_axes(CFG, LCFG)
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)) \
        == jax.tree.structure(delta)
    assert q_spec(specs) == (jax.sharding.PartitionSpec("layers", "embed", "lora_rank"),
                             jax.sharding.PartitionSpec("layers", "lora_rank", "heads", "head_dim"))
    o_specs = lora.get_path(specs, "layers/attn/o/kernel")
    assert o_specs["a"] == jax.sharding.PartitionSpec("layers", "heads", "head_dim", "lora_rank")


def q_spec(specs):
    q = lora.get_path(specs, "layers/attn/q/kernel")
    return q["a"], q["b"]


def test_init_statistics_match_lora_and_peft(base):
    r = 8
    g = init_lora(base, LoraConfig(r=r, init="gaussian"), jax.random.key(1))
    a = np.asarray(lora.get_path(g, "layers/mlp/down/kernel")["a"])        # (2, 128, 8)
    np.testing.assert_allclose(a.std(), 1 / r, rtol=0.05)                   # std 1/r
    p = init_lora(base, LoraConfig(r=r, init="peft"), jax.random.key(1))
    for path, fan_in in (("layers/mlp/down/kernel", 128), ("layers/attn/o/kernel", 4 * 16),
                         ("layers/attn/q/kernel", 64)):
        a = np.asarray(lora.get_path(p, path)["a"])
        bound = 1 / math.sqrt(fan_in)            # kaiming_uniform(a=sqrt(5)) over fan_in
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound, path
        np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.1)
        assert not np.any(np.asarray(lora.get_path(p, path)["b"]))


def test_scale_is_alpha_over_r_or_sqrt_r_and_the_model_uses_it(base):
    assert lora.scale(LoraConfig(r=4, alpha=8)) == 2.0
    assert lora.scale(LoraConfig(r=4, alpha=8, rslora=True)) == 4.0
    delta = randomised(init_lora(base, LCFG, jax.random.key(1)))
    doubled_b = jax.tree_util.tree_map_with_path(
        lambda p, x: 2 * x if jax.tree_util.keystr(p).endswith("['b']") else x, delta)
    x = tokens()
    y_alpha = forward(lora.attach(base, delta, LoraConfig(r=4, alpha=16.0)), x, CFG)
    y_b = forward(lora.attach(base, doubled_b, LCFG), x, CFG)
    np.testing.assert_allclose(y_alpha, y_b, atol=1e-5, rtol=1e-5)
    assert np.abs(y_alpha - forward(lora.attach(base, delta, LCFG), x, CFG)).max() > 0.05


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_forward_equals_attached_forward(base, rslora):
    cfg = LoraConfig(r=4, alpha=8.0, rslora=rslora)
    delta = randomised(init_lora(base, cfg, jax.random.key(1)))
    x = tokens()
    attached = forward(lora.attach(base, delta, cfg), x, CFG)
    merged = lora.merge(base, delta, cfg)
    assert "lora" not in merged
    np.testing.assert_allclose(forward(merged, x, CFG), attached, atol=1e-5, rtol=1e-5)
    assert np.abs(attached - forward(base, x, CFG)).max() > 0.1     # B != 0 mattered
    # only the targets changed
    np.testing.assert_array_equal(merged["layers"]["attn_norm"]["scale"],
                                  base["layers"]["attn_norm"]["scale"])
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])


def test_merge_then_unmerge_round_trips(base):
    delta = randomised(init_lora(base, LCFG, jax.random.key(1)))
    back = lora.unmerge(lora.merge(base, delta, LCFG), delta, LCFG)
    for path in lora.delta_paths(delta):
        w, w2 = np.asarray(lora.get_path(base, path)), np.asarray(lora.get_path(back, path))
        assert np.linalg.norm(w2 - w) / np.linalg.norm(w) < 1e-6, path
        assert not np.array_equal(np.asarray(lora.get_path(lora.merge(base, delta, LCFG), path)), w)


def test_lora_applies_under_remat_eager_and_kv_cache(base):
    delta = randomised(init_lora(base, LCFG, jax.random.key(1)))
    params = lora.attach(base, delta, LCFG)
    x = tokens(t=10)
    ref = forward(params, x, CFG)
    np.testing.assert_allclose(forward(params, x, dataclasses.replace(CFG, remat="full")), ref, atol=1e-5)
    with jax.disable_jit():
        np.testing.assert_allclose(forward(params, x, CFG), ref, atol=1e-5)
    # prefill 7 tokens into a cache, then 3 more: same hidden states as one full pass
    cache = jaxllm.init_cache(CFG, 2, 16)
    h1, cache = trunk(params, x[:, :7], CFG, cache=cache)
    h2, _ = trunk(params, x[:, 7:], CFG, cache=cache, positions=jnp.arange(7, 10)[None].repeat(2, 0))
    full, _ = trunk(params, x, CFG)
    np.testing.assert_allclose(jnp.concatenate([h1, h2], 1), full, atol=1e-5)


def test_lora_dropout_only_with_an_rng(base):
    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.5)
    params = lora.attach(base, randomised(init_lora(base, cfg, jax.random.key(1))), cfg)
    x = tokens()
    plain, _ = trunk(params, x, CFG)
    np.testing.assert_array_equal(plain, trunk(params, x, CFG)[0])   # no rng: no dropout
    d1, _ = trunk(params, x, CFG, dropout_rng=jax.random.key(7))
    d1b, _ = trunk(params, x, CFG, dropout_rng=jax.random.key(7))
    d2, _ = trunk(params, x, CFG, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(d1, d1b)
    assert np.abs(d1 - plain).max() > 1e-2 and np.abs(d1 - d2).max() > 1e-2
    # the base path is never dropped: with B = 0 the rng changes nothing
    fresh = lora.attach(base, init_lora(base, cfg, jax.random.key(1)), cfg)
    np.testing.assert_array_equal(trunk(fresh, x, CFG, dropout_rng=jax.random.key(7))[0],
                                  trunk(base, x, CFG)[0])


# ---------------------------------------------------------------------------- bad input
def test_target_regex_matching_nothing_lists_the_available_paths(base):
    with pytest.raises(ConfigError,
                       match=r"matches no parameter path.*layers/attn/q/kernel.*layers/mlp/up/kernel"):
        init_lora(base, LoraConfig(r=4, targets=r"layers/attn/query/kernel"), jax.random.key(0))
    with pytest.raises(ConfigError, match=r"matches \['embed/embedding'.*which LoRA does not adapt"):
        lora.delta_logical_axes(CFG, LoraConfig(r=4, targets=".*"))
    with pytest.raises(ConfigError, match="not a valid regex"):
        init_lora(base, LoraConfig(r=4, targets="layers/(attn"), jax.random.key(0))


def test_rank_zero_is_refused_when_lora_is_asked_for(base):
    for call in (lambda: init_lora(base, LoraConfig(r=0), jax.random.key(0)),
                 lambda: lora.make_merge(LoraConfig(r=0)),
                 lambda: lora.delta_logical_axes(CFG, LoraConfig(r=0))):
        with pytest.raises(ConfigError, match=r"lora.r=0: LoRA needs a rank r >= 1"):
            call()
    with pytest.raises(ConfigError, match="lora.r must be >= 0"):
        LoraConfig(r=-1)



def test_attach_refuses_a_delta_that_does_not_fit(base):
    delta = init_lora(base, LCFG, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"delta adapts .* but lora.targets="):
        lora.attach(base, delta, LoraConfig(r=4, targets=r"layers/attn/(q|v)/kernel"))
    with pytest.raises(ConfigError,
                       match=r"layers/attn/k/kernel: A \(2, 64, 4\).*lora.r=8 needs A \(2, 64, 8\)"):
        lora.attach(base, delta, LoraConfig(r=8))
    with pytest.raises(ConfigError, match="already carry a LoRA delta"):
        lora.attach(lora.attach(base, delta, LCFG), delta, LCFG)


# ---------------------------------------------------------------------------- training
def batches(n, b=8, t=32):
    rows = [[synthetic_row(0, i * b + j, t, CFG.vocab_size) for j in range(b)] for i in range(n)]
    return [{k: np.stack([r[k] for r in rs]) for k in rs[0]} for rs in rows]


def train_delta(kind, mesh_shape, steps=3):
    """(losses, initial and final delta on the host, final state, frozen base as passed) after
    `steps` steps of the one train step on a (data, fsdp, tensor) mesh with the fsdp_tp rules."""
    module, delta_cfg = KINDS[kind]
    devices = jax.devices()[:math.prod(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = R.logical_rules(MeshConfig(preset="fsdp_tp"))
    base = init_params(CFG, jax.random.key(0))
    shapes = param_shapes(CFG)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), steps)
        init_fn = lambda k: module.init_delta(shapes, delta_cfg, k)   # noqa: E731
        _, shardings = plan_state(init_fn, module.delta_logical_axes(CFG, delta_cfg), optimizer, rules,
                                  mesh, frozen_specs=param_logical_axes(CFG), frozen_shapes=shapes)
        state = make_state(init_fn, optimizer, shardings, seed=0)
        delta0 = jax.device_get(state.params)      # a host copy: the step donates the state
        frozen = jax.device_put(base, shardings.frozen)
        step = make_train_step(make_clm_loss(CFG), optimizer, shardings, merge=module.make_merge(delta_cfg))
        losses = []
        for batch in batches(steps):
            state, metrics = step(state, jax.device_put(batch, shardings.batch), frozen)
            losses.append(float(metrics["loss"]))
    return losses, delta0, jax.device_get(state.params), state, frozen


@pytest.fixture(scope="module", params=list(KINDS))
def single(request):
    kind = request.param
    return kind, train_delta(kind, (1, 1, 1))


def test_training_changes_only_the_delta(single):
    kind, (losses, delta0, delta, state, frozen) = single
    base = init_params(CFG, jax.random.key(0))
    chex.assert_trees_all_equal(jax.device_get(frozen), base)           # bit-identical base
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), delta, delta0)
    assert all(jax.tree.leaves(changed)), changed
    assert all(np.isfinite(losses)) and len(losses) == 3
    # only the delta has optimizer state: two Adam moments of its size (plus scalar counters)
    n_delta = sum(x.size for x in jax.tree.leaves(delta))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_delta, (n_opt, n_delta, jaxllm.model.count_params(base))


def test_sharded_delta_training_matches_single_device(single):
    assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
    kind, (losses0, _, delta0, _, _) = single
    losses, _, delta, state, frozen = train_delta(kind, (2, 2, 2))
    np.testing.assert_allclose(losses, losses0, rtol=1e-5)
    flat = jax.tree_util.tree_flatten_with_path(delta)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(delta0)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        # fp32 reduction order differs between meshes; B is 3 Adam steps from zero, where
        # g / sqrt(v) magnifies it (1.1e-5 seen); a sharding bug is off by O(1)
        assert rel < 5e-5, (jax.tree_util.keystr(path), rel)
    chex.assert_trees_all_equal_shapes(delta, delta0)
    # the delta and the frozen base really were sharded as the rules say
    assert frozen["layers"]["attn"]["q"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    if kind == "lora":
        q = state.params["layers"]["attn"]["q"]["kernel"]
        assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
        assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    else:
        down = state.params["layers"]["after_attn"]["down"]["kernel"]
        assert down.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
