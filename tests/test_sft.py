"""SFT: the causal-LM loss under the chat mask, per-token or per-sequence, from a pretrained run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import ModelConfig
from jaxllm.objectives import make_sft_loss

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def packed_batch():
    """Two rows; row 0 packs examples of 3 and 9 answer tokens, row 1 one of 5 (+ padding)."""
    t = 24
    tokens = jax.random.randint(jax.random.key(0), (2, t), 2, CFG.vocab_size)
    seg = jnp.array([[1] * 8 + [2] * 16, [1] * 12 + [0] * 12])
    mask = jnp.zeros((2, t), jnp.int32)
    mask = mask.at[0, 5:8].set(1).at[0, 15:24].set(1).at[1, 7:12].set(1)
    pos = jaxllm.model.positions_from_segments(seg)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def test_per_sequence_normalisation_weighs_every_example_the_same():
    params = jaxllm.init_params(CFG, jax.random.key(1))
    batch = packed_batch()
    tok_loss, tok_sums = make_sft_loss(CFG)(params, batch, None)
    seq_loss, seq_sums = make_sft_loss(CFG, normalize="sequence")(params, batch, None)
    logits = jaxllm.forward(params, batch["tokens"], CFG, positions=batch["positions"],
                            segment_ids=batch["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch["tokens"][:, 1:, None], -1)[..., 0]
    examples = [(0, 5, 8), (0, 15, 24), (1, 7, 12)]   # (row, first target, end)
    per_example = [float(jnp.mean(nll[r, a - 1:b - 1])) for r, a, b in examples]
    np.testing.assert_allclose(float(seq_loss), sum(per_example), rtol=1e-5)
    assert float(seq_sums["weight"]) == 3 and float(seq_sums["tokens"]) == 17
    np.testing.assert_allclose(float(tok_loss), sum(float(jnp.sum(nll[r, a - 1:b - 1])) for r, a, b in examples),
                               rtol=1e-5)
    assert float(tok_sums["weight"]) == 17


def test_sft_needs_chat_data_and_chat_data_needs_sft(tmp_path):
    with pytest.raises(jaxllm.ConfigError, match="set data.kind=chat"):
        jaxllm.train(jaxllm.load_config(None, ["model=tiny", "train.objective=sft", "mesh.devices=1",
                                               f"train.run_dir={tmp_path}"]))
