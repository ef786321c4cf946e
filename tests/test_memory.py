"""Compiled memory of the real 125m train step: the chunked LM-head loss never holds the
whole (B, T, vocab) fp32 logits (compile only: nothing is allocated or run)."""
import dataclasses

import jax
import jax.numpy as jnp

import jaxllm
from jaxllm.config import OptimConfig
from jaxllm.objectives import make_clm_loss
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_train_step


def _step_temp_bytes(cfg, b, t):
    opt = make_optimizer(OptimConfig(), 10)
    step = make_train_step(make_clm_loss(cfg), opt)
    state = jax.eval_shape(lambda: TrainState.create(jaxllm.init_params(cfg, jax.random.key(0)),
                                                     opt, jax.random.key(1)))
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32)
             for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    return step.lower(state, batch, None).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_saves_at_least_one_logits_tensor_in_the_125m_step():
    # remat=full and a wide batch of short rows: the logits, not attention, set the peak
    cfg = jaxllm.load_config(None, ["model=125m", "model.compute_dtype=float32",
                                    "model.remat=full"]).model
    b, t = 64, 128
    logits_bytes = b * t * cfg.vocab_size * 4
    whole = _step_temp_bytes(dataclasses.replace(cfg, logits_chunk=0), b, t)
    chunked = _step_temp_bytes(dataclasses.replace(cfg, logits_chunk=32), b, t)
    print(f"125m step temp: whole logits {whole / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB, "
          f"one logits tensor {logits_bytes / 2**20:.0f} MiB")
    assert whole - chunked >= logits_bytes
