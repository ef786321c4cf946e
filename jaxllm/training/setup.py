"""Build a sharded TrainState directly on the mesh (no full copy on any one host)."""
from __future__ import annotations

from typing import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.parallel import rules as R
from jaxllm.training.state import TrainState
from jaxllm.training.step import StepShardings


def state_shardings(param_specs_logical, param_shapes, optimizer: optax.GradientTransformation,
                    rules, mesh: Mesh):
    """Shardings for a TrainState whose params have these logical specs. Optimizer moments
    follow their parameter (ZeRO: Adam states are sharded exactly like the weights)."""
    p_sh = R.param_shardings(param_specs_logical, param_shapes, rules, mesh)
    rep = NamedSharding(mesh, P())
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, p_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def init_state(init_fn: Callable[[jax.Array], object], param_specs_logical,
               optimizer: optax.GradientTransformation, rules, mesh: Mesh, seed: int):
    """-> (state, StepShardings). Params are created by a jitted init whose outputs are
    already sharded, so a model larger than one device's memory never materialises whole."""
    key = jax.random.key(seed)
    init_key, state_key = jax.random.split(key)
    shapes = jax.eval_shape(init_fn, init_key)
    sh = state_shardings(param_specs_logical, shapes, optimizer, rules, mesh)

    def make(k1, k2):
        return TrainState.create(init_fn(k1), optimizer, k2)

    state = jax.jit(make, out_shardings=sh)(init_key, state_key)
    return state, StepShardings(state=sh, batch=R.batch_sharding(mesh),
                                replicated=NamedSharding(mesh, P()))
