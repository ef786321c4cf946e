"""THE train step: one jitted, sharded function for every objective.

    step = make_train_step(loss_fn, optimizer, shardings, microbatches=4)
    state, metrics = step(state, batch, frozen)

`loss_fn(params, batch, rng) -> (loss_sum, metrics_sums)` is all an objective supplies.
What is trained is `state.params`; `frozen` (a base model under LoRA, a reference policy, ...)
is a non-donated argument, and `merge(trainable, frozen)` builds the params the loss sees.
The step never branches on the objective.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.training.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def _identity_merge(trainable, frozen):
    del frozen
    return trainable


@dataclasses.dataclass(frozen=True)
class StepShardings:
    state: Any               # pytree of NamedSharding matching TrainState
    # One NamedSharding for every batch leaf (its spec names the leading batch dim only, so
    # it fits leaves of any rank), or a dict of them per batch key.
    batch: Any
    frozen: Any = None       # pytree of NamedSharding matching the frozen argument
    replicated: Any = None


def _split_microbatches(batch: dict, m: int, batch_sharding) -> dict:
    """(B, ...) -> (M, B/M, ...). Rows b*M..b*M+M-1 go to microbatches 0..M-1 so each
    device keeps its own rows (no cross-device shuffle under a batch-sharded layout)."""
    def split(x, sh):
        y = jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)
        if sh is not None:
            y = jax.lax.with_sharding_constraint(y, NamedSharding(sh.mesh, P(None, *sh.spec)))
        return y
    if batch_sharding is None or isinstance(batch_sharding, NamedSharding):
        return jax.tree.map(lambda x: split(x, batch_sharding), batch)
    return jax.tree.map(split, batch, batch_sharding)


def _offload_shardings(shardings: StepShardings | None):
    """(device, host) shardings of the optimizer state when it lives in host memory, else None."""
    if shardings is None:
        return None
    host = shardings.state.opt_state
    if all(sh.memory_kind in (None, "device") for sh in jax.tree.leaves(host)):
        return None
    return jax.tree.map(lambda sh: sh.with_memory_kind("device"), host), host


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    shardings: StepShardings | None = None, *, microbatches: int = 1,
                    merge: Callable = _identity_merge,
                    optimizer_metrics: Callable[[Any, Any], dict] | None = None,
                    jit: bool = True, grad_compression: str = "none", mesh=None):
    """optimizer_metrics(opt_state_before, opt_state_after) -> extra metrics (for the
    default optimizer: optim.skip_metrics, the skip counters and the lr used).
    grad_compression "bf16" / "int8" reduces the gradients over the data axis of a
    data-parallel `mesh` in that precision (parallel/compress.py); int8 keeps its error
    feedback beside the optimizer state: state.opt_state is (optimizer state, error), see
    compress.with_error_feedback."""
    offload = _offload_shardings(shardings)

    def grads_of(params, frozen, batch, rng):
        def f(p):
            return loss_fn(merge(p, frozen), batch, rng)
        (loss_sum, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, dict(sums, loss=loss_sum)

    def summed_grads(params, frozen, batch, step_rng, batch_sharding):
        if microbatches == 1:
            return grads_of(params, frozen, batch, step_rng)
        micro = _split_microbatches(batch, microbatches, batch_sharding)

        def body(acc, xs):
            mb, i = xs
            g, s = grads_of(params, frozen, mb, jax.random.fold_in(step_rng, i))
            return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g), s
        # accumulate in fp32 whatever the parameter dtype; sums come out stacked (M,)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, sums_m = jax.lax.scan(body, zeros, (micro, jnp.arange(microbatches)))
        return grads, jax.tree.map(lambda s: jnp.sum(s, axis=0), sums_m)

    reduce = None
    if grad_compression == "int8" and offload is not None:
        raise ValueError("int8 gradient compression keeps its error feedback beside the optimizer state; "
                         "it does not combine with optim.offload_state")
    if grad_compression != "none":
        from jaxllm.parallel import compress
        if mesh is None:
            raise ValueError(f"grad_compression={grad_compression!r} reduces over a mesh's data axis: pass mesh=")
        spec = shardings.batch.spec if shardings is not None else jax.sharding.PartitionSpec("data")
        reduce = compress.data_parallel_reduce(
            lambda p, f, b, r: summed_grads(p, f, b, r, None), grad_compression, mesh, spec)

    def step(state: TrainState, batch: dict, frozen=None):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        opt_state_in, comm_error = state.opt_state, None
        if grad_compression == "int8":
            opt_state_in, comm_error = state.opt_state
        if reduce is None:
            grads, sums = summed_grads(state.params, frozen, batch, step_rng,
                                       shardings.batch if shardings else None)
        else:
            grads, sums, comm_error = reduce(state.params, frozen, batch, step_rng, comm_error)
        # Token-weighted mean: gradient of sum(loss) / total weight, over all microbatches.
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, state.params)
        opt_before = opt_state_in
        if offload is not None:    # host -> device for the update (ZeRO-Offload)
            opt_before = jax.device_put(opt_before, offload[0])
        updates, opt_state = optimizer.update(grads, opt_before, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
        metrics["weight"] = sums["weight"]
        metrics["grad_norm"] = optax.tree.norm(grads)
        if "segment_ids" in batch:    # real (non-padding) tokens, for tokens/s and MFU
            metrics["real_tokens"] = jnp.sum(batch["segment_ids"] != 0)
        if optimizer_metrics is not None:
            metrics.update(optimizer_metrics(opt_before, opt_state))
        if offload is not None:    # device -> host until the next step
            opt_state = jax.device_put(opt_state, offload[1])
        if grad_compression == "int8":
            opt_state = (opt_state, comm_error)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        return new_state, metrics

    if not jit:
        return step
    kwargs = {}
    if shardings is not None:
        rep = shardings.replicated
        kwargs = dict(in_shardings=(shardings.state, shardings.batch, shardings.frozen),
                      out_shardings=(shardings.state, rep))
    return jax.jit(step, donate_argnums=(0,), **kwargs)


def make_eval_step(loss_fn: LossFn, merge: Callable = _identity_merge, shardings=None):
    """Jitted (params, batch, frozen) -> sums (loss, weight, ...), for held-out evaluation.
    The loss gets rng=None: no dropout, and objectives that sample (MLM masks) use a fixed key."""
    def evaluate(params, batch, frozen=None):
        loss_sum, sums = loss_fn(merge(params, frozen), batch, None)
        return dict(sums, loss=loss_sum)
    if shardings is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, in_shardings=(shardings.state.params, shardings.batch, shardings.frozen),
                   out_shardings=shardings.replicated)
