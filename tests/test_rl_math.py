"""The RL formulas, each against a plain-Python or hand computation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.configlib import ConfigError
from jaxllm.objectives.dpo import dpo_loss
from jaxllm.objectives.ppo import clipped_policy_loss, clipped_value_loss
from jaxllm.rl.advantages import gae, group_advantages, masked_mean, masked_whiten
from jaxllm.rl.kl import AdaptiveKL, kl_estimate, per_token_rewards


def gae_loop(r, v, gamma, lam):
    """Textbook GAE over one sequence of real tokens (V after the end = 0)."""
    adv, last = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        nv = v[t + 1] if t + 1 < len(r) else 0.0
        delta = r[t] + gamma * nv - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_a_python_loop_with_left_and_right_padding():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 9)).astype(np.float32), rng.normal(size=(3, 9)).astype(np.float32)
    mask = np.zeros((3, 9), np.float32)
    mask[0, :9] = 1          # full row
    mask[1, 2:7] = 1         # prompt before, padding after
    mask[2, 4:6] = 1
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma=0.97, lam=0.9)
    for b in range(3):
        idx = np.nonzero(mask[b])[0]
        want = gae_loop(r[b, idx], v[b, idx], 0.97, 0.9)
        np.testing.assert_allclose(np.asarray(adv)[b, idx], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret)[b, idx], np.asarray(want) + v[b, idx], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(adv)[b, mask[b] == 0] == 0)
    # gamma = lambda = 1: the advantage is the reward-to-go minus the value
    adv1, _ = gae(jnp.asarray(r[:1]), jnp.asarray(v[:1]), jnp.ones((1, 9)), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv1[0], np.cumsum(r[0][::-1])[::-1] - v[0], rtol=1e-5, atol=1e-5)


def test_masked_whitening_uses_only_masked_entries():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 6.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 1, 0, 1]])
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    w = masked_whiten(x, m)
    want = (vals - vals.mean()) / vals.std(ddof=1)
    np.testing.assert_allclose(np.asarray(w)[np.asarray(m) == 1], want, rtol=1e-5)
    assert float(w[0, 3]) == 0 and float(w[1, 2]) == 0
    kept = masked_whiten(x, m, shift_mean=False)
    np.testing.assert_allclose(np.asarray(kept)[np.asarray(m) == 1], want + vals.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(masked_mean(x, m)), vals.mean())


def test_clipped_policy_and_value_losses_by_hand():
    logp, old = jnp.log(jnp.array([1.5, 0.5, 1.1, 0.9])), jnp.zeros(4)
    adv = jnp.array([1.0, 1.0, -2.0, -2.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2)
    # r=1.5,A=1: min(1.5, 1.2) -> -1.2 ; r=0.5,A=1: min(0.5, 0.8) -> -0.5 ;
    # r=1.1,A=-2: min(-2.2, -2.2) -> 2.2 ; r=0.9,A=-2: min(-1.8, -1.8) -> 1.8
    np.testing.assert_allclose(loss, [-1.2, -0.5, 2.2, 1.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [1, 1, 0, 0])
    v, v_old, ret = jnp.array([1.0, 0.0]), jnp.array([0.5, 0.0]), jnp.array([0.0, 1.0])
    vf, vclip = clipped_value_loss(v, v_old, ret, 0.2)
    # V=1 clipped to 0.7: max(1, 0.49)/2 = 0.5 ; V=0 (no move): 0.5
    np.testing.assert_allclose(vf, [0.5, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(vclip, [0, 0])
    vf2, vclip2 = clipped_value_loss(jnp.array([2.0]), jnp.array([0.0]), jnp.array([3.0]), 0.2)
    np.testing.assert_allclose(vf2, [0.5 * (3.0 - 0.2) ** 2])   # the clipped value is further off
    assert float(vclip2[0]) == 1
    # inside the band nothing is clipped and the loss is V's own, whatever the rounding: the form
    # V_old + clip(V - V_old) missed V by an ulp in 44 of these 4096 and counted 21 as clipped
    rng = np.random.default_rng(0)
    v_old = (rng.normal(size=4096) * 3).astype(np.float32)
    v = (v_old.astype(np.float64) + rng.uniform(-0.19, 0.19, 4096)).astype(np.float32)
    ret = (v + rng.normal(size=4096) * 1e-3).astype(np.float32)          # returns near V: rounding shows
    vf3, vclip3 = clipped_value_loss(jnp.asarray(v), jnp.asarray(v_old), jnp.asarray(ret), 0.2)
    assert float(jnp.sum(vclip3)) == 0
    np.testing.assert_array_equal(vf3, 0.5 * jnp.square(jnp.asarray(v) - jnp.asarray(ret)))


def test_kl_estimators_by_hand_and_k3_unbiased():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    lr = math.log(2.0)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), [lr], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k2"), [0.5 * lr ** 2], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k3"), [0.5 - 1 + lr], rtol=1e-6)
    # over samples from p, k1 and k3 average to KL(p || q); k3 is never negative
    p, q = jnp.array([0.6, 0.3, 0.1]), jnp.array([0.2, 0.5, 0.3])
    y = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
    true_kl = float(jnp.sum(p * jnp.log(p / q)))
    for kind in ("k1", "k3"):
        est = kl_estimate(jnp.log(p)[y], jnp.log(q)[y], kind)
        np.testing.assert_allclose(float(jnp.mean(est)), true_kl, rtol=0.02)
    assert float(jnp.min(kl_estimate(jnp.log(p)[y], jnp.log(q)[y], "k3"))) >= 0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    kl = jnp.ones((2, 5)) * 0.5
    mask = jnp.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    r = per_token_rewards(jnp.array([2.0, -1.0]), kl, mask, beta=0.1)
    np.testing.assert_allclose(r, [[0, -0.05, -0.05, 1.95, 0], [0, 0, -0.05, -0.05, -1.05]], rtol=1e-6)


def test_adaptive_kl_moves_beta_towards_the_target():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=10_000)
    np.testing.assert_allclose(c.update(12.0, 256), 0.1 * (1 + 0.2 * 256 / 10_000))   # clipped at +0.2
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=10_000)
    np.testing.assert_allclose(c.update(5.4, 100), 0.1 * (1 - 0.1 * 100 / 10_000))


def test_dpo_loss_by_hand():
    pol = jnp.array([[-3.0, -5.0], [-4.0, -4.0]])
    ref = jnp.array([[-3.5, -4.5], [-4.0, -4.0]])
    loss, margin = dpo_loss(pol, ref, beta=0.1)
    m0 = 0.1 * ((-3.0 + 3.5) - (-5.0 + 4.5))          # 0.1
    np.testing.assert_allclose(margin, [m0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(loss, [-math.log(1 / (1 + math.exp(-m0))), math.log(2.0)], rtol=1e-6)


def test_group_advantages_normalise_within_each_prompt():
    s = jnp.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages(s)
    g = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(a[0], (g - g.mean()) / (g.std() + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(a[1], 0.0)                # all equal: no signal, not NaN


def test_dpo_objective_over_rankings_is_the_mean_over_its_pairs():
    import jaxllm
    from jaxllm.objectives.dpo import make_dpo_loss, sequence_logps
    cfg = jaxllm.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    b, k, t = 2, 3, 8
    batch = {"tokens": jax.random.randint(jax.random.key(1), (b, k, t), 0, 32),
             "positions": jnp.broadcast_to(jnp.arange(t), (b, k, t)),
             "segment_ids": jnp.ones((b, k, t), jnp.int32),
             "loss_mask": jnp.zeros((b, k, t), jnp.int32).at[:, :, 4:].set(1),
             "response_mask": jnp.array([[1, 1, 1], [1, 1, 0]]),      # row 1: K padded to 3
             "ref_logps": jax.random.normal(jax.random.key(2), (b, k))}
    loss, sums = make_dpo_loss(cfg, beta=0.5)(params, batch, None)
    pol = np.asarray(sequence_logps(params, batch, cfg))
    ref = np.asarray(batch["ref_logps"])
    pairs = [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]          # (row, better, worse)
    want = [-math.log(1 / (1 + math.exp(-0.5 * ((pol[r, i] - ref[r, i]) - (pol[r, j] - ref[r, j])))))
            for r, i, j in pairs]
    np.testing.assert_allclose(float(loss), sum(want), rtol=1e-5)
    assert float(sums["weight"]) == 4
    # a policy equal to its reference: every pair log 2
    same = dict(batch, ref_logps=jnp.asarray(pol))
    np.testing.assert_allclose(float(make_dpo_loss(cfg)(params, same, None)[0]) / 4, math.log(2), rtol=1e-5)


def test_rpo_alpha_adds_the_best_answers_per_token_nll_once_per_pair():
    import jaxllm
    from jaxllm.objectives.dpo import make_dpo_loss, sequence_logps
    cfg = jaxllm.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    b, k, t = 2, 3, 8
    loss_mask = jnp.zeros((b, k, t), jnp.int32).at[:, :, 4:].set(1).at[1, 0, 4:6].set(0)  # row 1 best: 2 tokens
    batch = {"tokens": jax.random.randint(jax.random.key(1), (b, k, t), 0, 32),
             "positions": jnp.broadcast_to(jnp.arange(t), (b, k, t)),
             "segment_ids": jnp.ones((b, k, t), jnp.int32), "loss_mask": loss_mask,
             "response_mask": jnp.array([[1, 1, 1], [1, 1, 0]]),      # 3 pairs, then 1
             "ref_logps": jax.random.normal(jax.random.key(2), (b, k))}
    plain, _ = make_dpo_loss(cfg, beta=0.5)(params, batch, None)
    rpo, sums = make_dpo_loss(cfg, beta=0.5, rpo_alpha=0.7)(params, batch, None)
    pol = np.asarray(sequence_logps(params, batch, cfg))
    want_nll = 3 * (-pol[0, 0] / 4) + 1 * (-pol[1, 0] / 2)
    np.testing.assert_allclose(float(sums["chosen_nll"]), want_nll, rtol=1e-5)
    np.testing.assert_allclose(float(rpo) - float(plain), 0.7 * want_nll, rtol=1e-5)
    with pytest.raises(ConfigError, match="dpo_rpo_alpha"):
        jaxllm.config.RLConfig(dpo_rpo_alpha=-1.0)


def test_the_value_heads_learning_rate_is_scaled_and_a_wrong_name_is_refused():
    from jaxllm.config import OptimConfig
    from jaxllm.training.optim import make_optimizer
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    params = {"policy": {"w": jnp.ones((3,))}, "value_head": {"kernel": jnp.ones((3,))}}
    grads = {"policy": {"w": jnp.asarray([1.0, -2.0, 0.5])}, "value_head": {"kernel": jnp.asarray([1.0, -2.0, 0.5])}}
    plain = make_optimizer(cfg, 10)
    scaled = make_optimizer(cfg, 10, lr_scales={"value_head": 100.0})
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_array_equal(u["policy"]["w"], u_plain["policy"]["w"])      # the rest untouched
    np.testing.assert_allclose(u["value_head"]["kernel"], 100.0 * u_plain["value_head"]["kernel"], rtol=1e-6)
    assert float(jnp.abs(u_plain["policy"]["w"][0])) > 0
    bad = make_optimizer(cfg, 10, lr_scales={"value_heads": 10.0})
    with pytest.raises(KeyError, match="value_heads"):
        bad.update(grads, bad.init(params), params)


def test_the_value_head_starts_as_the_reward_models_head():
    import types

    from jaxllm.training.rl import _value_head_from
    vh = {"kernel": jnp.zeros((4,)), "bias": jnp.asarray(0.5)}
    state = types.SimpleNamespace(params={"value_head": vh})
    logged = []
    run = types.SimpleNamespace(log=logged.append)
    rm_head = {"kernel": jnp.asarray([1.0, -2.0, 3.0, 0.25])}
    out = _value_head_from(rm_head, state, run)
    np.testing.assert_array_equal(out["kernel"], rm_head["kernel"])
    assert float(out["bias"]) == 0.0 and out["kernel"].dtype == vh["kernel"].dtype
    assert logged == ["value head: initialised from the reward model's head"]
    with pytest.raises(ConfigError, match="d_model differ"):
        _value_head_from({"kernel": jnp.ones((8,))}, state, run)


@pytest.mark.parametrize("override, match", [
    ("rl.kl_horizon=0", r"rl.kl_horizon must be in \(0, inf\)"),          # kl_target would divide by it
    ("rl.kl_horizon=-5", r"rl.kl_horizon must be in \(0, inf\)"),
    ("rl.kl_horizon=500", r"rl.kl_horizon is set but adaptive KL is off \(rl.kl_target=0\)"),
    ("rl.kl_target=-0.1", r"rl.kl_target must be in \[0, inf\)"),
    ("rl.lam=1.5", r"rl.lam must be in \[0, 1\]"),
    ("rl.lam=-0.1", r"rl.lam must be in \[0, 1\]"),
    ("rl.gamma=1.01", r"rl.gamma must be in \[0, 1\]"),
    ("rl.vf_coef=-1", r"rl.vf_coef must be in \[0, inf\)"),
    ("rl.entropy_coef=-0.01", r"rl.entropy_coef must be in \[0, inf\) \(an entropy bonus"),
    ("rl.top_p=0", r"rl.top_p must be in \(0, 1\]"),
    ("rl.top_p=1.5", r"rl.top_p must be in \(0, 1\]"),
    ("rl.top_k=-1", r"rl.top_k must be >= 0"),
    ("rl.clip=.inf", r"rl.clip must be in \(0, inf\)"),
    ("rl.clip=.nan", r"rl.clip must be in \(0, inf\)"),
    ("rl.dpo_beta=.inf", r"rl.dpo_beta must be in \(0, inf\)"),
    ("rl.kl_coef=.nan", r"rl.kl_coef must be in \[0, inf\)"),
    ("rl.missing_eos_penalty=-1", r"rl.missing_eos_penalty=-1.0: it is a penalty >= 0 that is subtracted.*write 1.0"),
    ("reward.margin=.nan", r"reward.margin must be a finite number >= 0, got nan"),
    ("train.sample_tokens=-1", r"train.sample_tokens must be >= 1"),
])
def test_bad_rl_reward_and_sampling_values_are_refused_naming_the_key(override, match):
    import jaxllm
    with pytest.raises(ConfigError, match=match):
        jaxllm.load_config(None, [override])
    jaxllm.load_config(None, ["train.objective=ppo", "rl.kl_target=0.1", "rl.kl_horizon=500", "rl.lam=1", "rl.gamma=0",
                              "rl.missing_eos_penalty=1", "rl.top_p=1"])     # the edges are valid


def test_dpo_chosen_reward_is_the_mean_best_implicit_reward_per_prompt_for_k_above_2():
    import jaxllm
    from jaxllm.objectives.dpo import make_dpo_loss, sequence_logps
    cfg = jaxllm.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    b, k, t = 3, 4, 8                                                    # K = 4: 6 pairs per prompt
    batch = {"tokens": jax.random.randint(jax.random.key(1), (b, k, t), 0, 32),
             "positions": jnp.broadcast_to(jnp.arange(t), (b, k, t)),
             "segment_ids": jnp.ones((b, k, t), jnp.int32),
             "loss_mask": jnp.zeros((b, k, t), jnp.int32).at[:, :, 4:].set(1),
             "response_mask": jnp.ones((b, k), jnp.int32),
             "ref_logps": jax.random.normal(jax.random.key(2), (b, k))}
    _, sums = make_dpo_loss(cfg, beta=0.5)(params, batch, None)
    best = 0.5 * (np.asarray(sequence_logps(params, batch, cfg))[:, 0] - np.asarray(batch["ref_logps"])[:, 0])
    assert float(sums["weight"]) == 18
    # the step logs sums / weight (the pair count): that is the mean over prompts
    np.testing.assert_allclose(float(sums["chosen_reward"]) / float(sums["weight"]), best.mean(), rtol=1e-5)


def test_grpo_loss_takes_beta_from_the_batch_when_given():
    """The recipe's adaptive beta (rl.kl_target) reaches GRPO's loss as batch["kl_coef"]."""
    import jaxllm
    from jaxllm.objectives.grpo import make_grpo_loss
    cfg = jaxllm.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    b, t = 4, 8
    batch = {"tokens": jax.random.randint(jax.random.key(1), (b, t), 0, 32),
             "positions": jnp.broadcast_to(jnp.arange(t), (b, t)), "segment_ids": jnp.ones((b, t), jnp.int32),
             "response_mask": jnp.zeros((b, t), jnp.int32).at[:, 4:].set(1),
             "old_logprobs": jnp.full((b, t), -3.0), "ref_logprobs": jnp.full((b, t), -2.0),
             "advantages": jnp.ones((b, t))}
    built_with = {beta: float(make_grpo_loss(cfg, beta=beta)(params, batch, None)[0]) for beta in (0.04, 0.5)}
    assert built_with[0.04] != built_with[0.5]
    from_batch = make_grpo_loss(cfg, beta=0.04)(params, dict(batch, kl_coef=jnp.full((b,), 0.5)), None)[0]
    np.testing.assert_allclose(float(from_batch), built_with[0.5], rtol=1e-6)


def test_rl_rollouts_never_sample_ids_beyond_the_tokenizer():
    """A model vocabulary padded above the tokenizer's (64 vs 40 ids): rollouts sample only ids
    the tokenizer has."""
    import types

    import jaxllm
    from jaxllm.config import Config, RLConfig, TrainConfig
    from jaxllm.training.rl import _Loop
    mc = jaxllm.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    cfg = Config(model=mc, rl=RLConfig(max_new_tokens=8, max_prompt_tokens=4), train=TrainConfig(objective="ppo"))
    tok = types.SimpleNamespace(vocab_size=40, eos_id=1, pad_id=0)
    loop = _Loop(cfg, None, tok, (1,), None, lambda p, f: p, None, types.SimpleNamespace(batch=None), False)
    params = jaxllm.init_params(mc, jax.random.key(0))
    prompts = jnp.asarray([[5, 6, 7, 8]] * 8, jnp.int32)
    gen = loop._generate(params, prompts, key=jax.random.key(3), prompt_mask=jnp.ones_like(prompts))
    ids = np.asarray(gen.tokens)[np.asarray(gen.mask) > 0]
    assert ids.size > 8 and ids.max() < 40, ids


@pytest.mark.parametrize("overrides, match", [
    (["train.objective=dpo", "rl.kl_coef=0.9"], "rl.kl_coef applies to train.objective=ppo/grpo, and this run trains"),
    (["train.objective=dpo", "rl.reward_model=/nowhere"], "rl.reward_model applies to train.objective=ppo/grpo"),
    (["train.objective=dpo", "reward.margin=5.0"], "reward.margin applies to train.objective=reward"),
    (["train.objective=ppo", "rl.dpo_beta=0.7"], "rl.dpo_beta applies to train.objective=dpo"),
    (["train.objective=ppo", "reward.k_max=9"], "reward.k_max applies to train.objective=reward/dpo"),
    (["train.objective=ppo", "train.seq_len=7"], "train.seq_len applies to train.objective=clm/mlm/sft/reward/dpo"),
    (["train.objective=grpo", "model=tiny", "rl.max_prompt_tokens=480"],
     r"rl.max_prompt_tokens=480 \+ rl.max_new_tokens=48 exceeds model.max_seq_len=512"),
])
def test_options_another_objective_reads_and_rollouts_beyond_the_window_are_refused(overrides, match):
    """An option the chosen objective never reads would be ignored without a word; a rollout
    longer than the model's window would fail at generation, mid-run."""
    import jaxllm
    with pytest.raises(ConfigError, match=match):
        jaxllm.load_config(None, overrides)
    jaxllm.load_config(None, [o for o in overrides if o.startswith(("train.objective", "model"))])   # without it: fine
