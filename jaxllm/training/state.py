"""The train state: one pytree holding everything a step changes."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar
    params: Any              # the TRAINABLE pytree (full params, or a LoRA delta, or a head)
    opt_state: optax.OptState
    rng: jax.Array           # uint32 key data, split every step

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array):
        import jax.numpy as jnp
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key_data(rng))
