"""Sharded train states built directly on the mesh (no full copy on any one host).

    abstract, shardings = plan_state(init_fn, param_specs, optimizer, rules, mesh)
    state = make_state(init_fn, optimizer, shardings, seed)            # fresh
    state = make_state(init_fn, optimizer, shardings, seed, params=p)  # from given params
    state, meta = checkpointer.restore(abstract)                       # or resume, no init

`frozen` (a LoRA base, a reference policy) gets shardings from its own logical axes.
"""
from __future__ import annotations

from typing import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.configlib import ConfigError
from jaxllm.parallel import rules as R
from jaxllm.training.state import TrainState
from jaxllm.training.step import StepShardings

HOST_MEMORY = "pinned_host"


def check_host_offload(mesh: Mesh):
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if HOST_MEMORY not in kinds:
        raise ConfigError(f"optim.offload_state=true needs host memory ({HOST_MEMORY}) on "
                          f"{mesh.devices.flat[0].platform}, which offers only {sorted(kinds)}")


def state_shardings(param_specs_logical, param_shapes, optimizer: optax.GradientTransformation,
                    rules, mesh: Mesh, offload_opt_state: bool = False) -> TrainState:
    """Shardings for a TrainState whose params have these logical specs. Optimizer moments
    follow their parameter (ZeRO: Adam states are sharded exactly like the weights); with
    offload_opt_state they sit in host memory, same layout (the step moves them in and out)."""
    p_sh = R.param_shardings(param_specs_logical, param_shapes, rules, mesh)
    rep = NamedSharding(mesh, P())
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, p_sh,
                                   transform_non_params=lambda _: rep)
    if offload_opt_state:
        check_host_offload(mesh)
        opt_sh = jax.tree.map(lambda sh: sh.with_memory_kind(HOST_MEMORY), opt_sh)
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def _keys(seed: int):
    return jax.random.split(jax.random.key(seed))   # (init key, state rng key)


def plan_state(init_fn: Callable[[jax.Array], object], param_specs_logical,
               optimizer: optax.GradientTransformation, rules, mesh: Mesh, *,
               frozen_specs=None, frozen_shapes=None, offload_opt_state: bool = False):
    """-> (abstract TrainState of ShapeDtypeStructs with shardings, StepShardings)."""
    init_key, state_key = _keys(0)
    shapes = jax.eval_shape(init_fn, init_key)
    sh = state_shardings(param_specs_logical, shapes, optimizer, rules, mesh, offload_opt_state)
    abstract = jax.eval_shape(lambda k1, k2: TrainState.create(init_fn(k1), optimizer, k2),
                              init_key, state_key)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
    frozen_sh = None
    if frozen_specs is not None:
        frozen_sh = R.param_shardings(frozen_specs, frozen_shapes, rules, mesh)
    return abstract, StepShardings(state=sh, batch=R.batch_sharding(mesh), frozen=frozen_sh,
                                   replicated=NamedSharding(mesh, P()))


def make_state(init_fn: Callable[[jax.Array], object], optimizer: optax.GradientTransformation,
               shardings: StepShardings, seed: int, params=None) -> TrainState:
    """A fresh state from `init_fn(key)` (jitted, outputs already sharded, so a model larger
    than one device's memory never materialises whole), or around given `params` (placed
    into the state's shardings; only the optimizer state is created)."""
    init_key, state_key = _keys(seed)
    if params is None:
        return jax.jit(lambda k1, k2: TrainState.create(init_fn(k1), optimizer, k2),
                       out_shardings=shardings.state)(init_key, state_key)
    params = jax.device_put(params, shardings.state.params)
    return jax.jit(lambda p, k2: TrainState.create(p, optimizer, k2),
                   out_shardings=shardings.state)(params, state_key)


def init_state(init_fn, param_specs_logical, optimizer, rules, mesh: Mesh, seed: int):
    """-> (fresh state, StepShardings): plan_state + make_state in one call."""
    _, shardings = plan_state(init_fn, param_specs_logical, optimizer, rules, mesh)
    return make_state(init_fn, optimizer, shardings, seed), shardings
