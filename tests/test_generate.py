"""KV-cache decoding (jaxllm.model.generate) is the model's own next-token distribution.

Greedy with the cache equals greedy by full forward passes on the growing sequence; returned
log-probs equal log_softmax of a full forward; HF transformers' greedy continuation is
reproduced; sampling respects top-k / top-p and a fixed key; a sharded mesh changes nothing.
"""
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import MeshConfig
from jaxllm.model.generate import Generation, GenerationError, generate, left_pad, prefill, sample_logits, stream
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules as rules_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# Ragged prompts: one batch needs left padding of 0, 5 and 6 tokens.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3]]


def small_cfg(**kw) -> jaxllm.ModelConfig:
    # GQA (4 query heads on 2 kv heads) and Qwen2-style q/k/v biases; init_std 0.3 makes the
    # next-token distributions peaked, so greedy ties (which any rounding could flip) are rare.
    base = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                qkv_bias=True, max_seq_len=64, init_std=0.3)
    return jaxllm.ModelConfig(**{**base, **kw})


def with_biases(params, key):
    """Biases start at zero; make them matter so a dropped bias changes the tokens."""
    attn = params["layers"]["attn"]
    for i, name in enumerate(("q", "k", "v")):
        b = attn[name]["bias"]
        attn[name]["bias"] = 0.5 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype)
    return params


@pytest.fixture(scope="module")
def model():
    cfg = small_cfg()
    return cfg, with_biases(jaxllm.init_params(cfg, jax.random.key(0)), jax.random.key(1))


# The cached decode and a full forward round differently (fp32, logits of size ~10 with
# init_std 0.3): worst |diff| in the logprob tests 6.7e-6 on jax 0.10.2, 7.5e-6 on 0.12.0.1,
# 1.15e-5 on 0.12.1. A temperature or renormalisation bug moves a logprob by 1e-2 or more.
LOGPROB_ATOL = 5e-5
WIDTH = 32   # every reference forward runs on a (1, WIDTH) buffer: one compiled shape
_forward = jax.jit(jaxllm.forward, static_argnames=("cfg",))


def buffer(tokens):
    """Tokens at the start of a fixed-width row. The forward is causal, so the logits at
    position t see tokens 0..t only: the filler after them changes nothing."""
    buf = np.zeros((1, WIDTH), np.int32)
    buf[0, :len(tokens)] = tokens
    return buf


def greedy_by_forward(params, cfg, prompt, n):
    """Reference: argmax of a full forward over the growing (unpadded) sequence, n times."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(_forward(params, jnp.asarray(buffer(seq)), cfg=cfg)[0, len(seq) - 1])))
    return seq[len(prompt):]


def forward_logprobs(params, cfg, prompt, completion, temperature):
    """log_softmax(logits / T) of a full forward at each completion token."""
    seq = list(prompt) + list(completion)
    logits = _forward(params, jnp.asarray(buffer(seq)), cfg=cfg)[0, len(prompt) - 1:len(seq) - 1] / temperature
    return np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(completion)[:, None], -1)[:, 0])


# ------------------------------------------------------------------ the cache is the model
@pytest.mark.parametrize("compute_dtype,matmul", [("float32", "xla"), ("bfloat16", "xla"), ("float32", "blas")])
def test_cached_greedy_equals_full_forward_greedy_for_ragged_prompts(compute_dtype, matmul):
    """matmul=blas: the prefill and every decode step (queries over a left-padded, half-filled
    cache) run the fused CPU attention kernel, the forward reference too."""
    cfg = small_cfg(compute_dtype=compute_dtype, matmul=matmul)
    params = with_biases(jaxllm.init_params(cfg, jax.random.key(0)), jax.random.key(1))
    n = 12
    out = generate(params, PROMPTS, cfg, max_new_tokens=n, key=jax.random.key(0), eos_id=None, pad_id=0)
    chex.assert_shape([out.tokens, out.logprobs, out.mask], (len(PROMPTS), n))
    chex.assert_shape([out.prompt_tokens, out.prompt_mask], (len(PROMPTS), 7))
    assert (np.asarray(out.mask) == 1).all()  # no eos: every row runs to max_new_tokens
    for b, prompt in enumerate(PROMPTS):
        assert np.asarray(out.tokens[b]).tolist() == greedy_by_forward(params, cfg, prompt, n), b


def test_padding_does_not_change_a_rows_continuation(model):
    cfg, params = model
    together = generate(params, PROMPTS, cfg, max_new_tokens=8, key=jax.random.key(0), eos_id=None, pad_id=0)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(params, [prompt], cfg, max_new_tokens=8, key=jax.random.key(0), eos_id=None, pad_id=0)
        np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(together.logprobs[b], alone.logprobs[0], atol=1e-5)


def test_wider_left_padding_changes_no_token_or_logprob(model):
    """left_pad(multiple=32) (what chat_exact_match uses to bound its compiled shapes) pads the
    batch to width 32 instead of 7: the same continuations and log-probs."""
    cfg, params = model
    tokens, mask = left_pad(PROMPTS, 0, multiple=32)
    chex.assert_shape([tokens, mask], (3, 32))
    assert mask.sum(1).tolist() == [7, 2, 1] and (tokens[mask == 0] == 0).all()
    kw = dict(max_new_tokens=10, key=jax.random.key(0), eos_id=None, pad_id=0)
    narrow = generate(params, PROMPTS, cfg, **kw)
    wide = generate(params, tokens, cfg, prompt_mask=mask, **kw)
    np.testing.assert_array_equal(wide.tokens, narrow.tokens)
    np.testing.assert_allclose(wide.logprobs, narrow.logprobs, atol=1e-5)
    with pytest.raises(GenerationError, match="left_pad: multiple must be a positive integer, got 0"):
        left_pad(PROMPTS, 0, multiple=0)


def test_cache_is_compute_dtype_with_unrepeated_kv_heads():
    cfg = small_cfg(compute_dtype="bfloat16", n_heads=8, n_kv_heads=2, d_model=64)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    tokens, mask = left_pad(PROMPTS, 0)
    logits, cache, next_pos = prefill(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_len=20)
    chex.assert_shape(cache["k"], (cfg.n_layers, 3, 20, 2, cfg.dim_per_head))
    assert cache["k"].dtype == cache["v"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32 and logits.shape == (3, cfg.vocab_size)
    assert np.asarray(next_pos).tolist() == [7, 2, 1]          # RoPE counts real tokens only
    assert int(cache["index"]) == 7
    np.testing.assert_array_equal(cache["segment_ids"][:, :7], mask)  # padding is segment 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_log_softmax_of_a_full_forward(model, temperature):
    cfg, params = model
    out = generate(params, PROMPTS, cfg, max_new_tokens=10, key=jax.random.key(3), temperature=temperature,
                   eos_id=None, pad_id=0)
    for b, prompt in enumerate(PROMPTS):
        ref = forward_logprobs(params, cfg, prompt, np.asarray(out.tokens[b]).tolist(), temperature)
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), ref, atol=LOGPROB_ATOL, rtol=0)


def test_greedy_logprobs_are_under_temperature_one_and_top_k_does_not_renormalise(model):
    cfg, params = model
    greedy = generate(params, PROMPTS, cfg, max_new_tokens=6, key=jax.random.key(0), eos_id=None, pad_id=0)
    topk = generate(params, PROMPTS, cfg, max_new_tokens=6, key=jax.random.key(0), temperature=0.5,
                    top_k=3, top_p=0.8, eos_id=None, pad_id=0)
    for b, prompt in enumerate(PROMPTS):
        for out, t in ((greedy, 1.0), (topk, 0.5)):
            ref = forward_logprobs(params, cfg, prompt, np.asarray(out.tokens[b]).tolist(), t)
            np.testing.assert_allclose(np.asarray(out.logprobs[b]), ref, atol=LOGPROB_ATOL, rtol=0)


def test_rows_stop_at_eos_or_stop_ids_and_the_mask_ends_with_the_stop_token(model):
    cfg, params = model
    free = generate(params, PROMPTS, cfg, max_new_tokens=10, key=jax.random.key(0), eos_id=None, pad_id=0)
    free_tokens = np.asarray(free.tokens)
    eos = int(free_tokens[0, 3])   # row 0 emits it at step 3 (greedy is deterministic)
    stop = int(free_tokens[1, 5])
    out = generate(params, PROMPTS, cfg, max_new_tokens=10, key=jax.random.key(0), eos_id=eos, pad_id=0,
                   stop_ids=(stop,))
    tokens, mask, lp = map(np.asarray, (out.tokens, out.mask, out.logprobs))
    for b in range(len(PROMPTS)):
        hits = [t for t in range(10) if free_tokens[b, t] in (eos, stop)]
        end = hits[0] + 1 if hits else 10                       # tokens up to and including the stop
        assert mask[b].tolist() == [1] * end + [0] * (10 - end), b
        np.testing.assert_array_equal(tokens[b, :end], free_tokens[b, :end])
        assert (tokens[b, end:] == 0).all() and (lp[b, end:] == 0).all()
    assert mask[0].sum() <= 4 and mask[1].sum() <= 6


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2"])
def test_greedy_matches_transformers_generate(case):
    """Golden: transformers' generate(do_sample=False) on the same weights (fixtures/generate)."""
    ref = np.load(FIXTURES / "generate" / f"{case}.npz")
    cfg, params = jaxllm.load_hf(FIXTURES / "hf" / case)
    prompts = [row[:n].tolist() for row, n in zip(ref["prompt_ids"], ref["prompt_len"])]
    eos = int(ref["eos_id"])
    n = int(ref["max_new_tokens"])
    out = generate(params, prompts, cfg, max_new_tokens=n, key=jax.random.key(0),
                   eos_id=None if eos < 0 else eos, pad_id=0)
    for b in range(len(prompts)):
        k = int(ref["output_len"][b])
        assert int(np.asarray(out.mask[b]).sum()) == k, b
        assert np.asarray(out.tokens[b, :k]).tolist() == ref["output_ids"][b, :k].tolist(), b
        np.testing.assert_allclose(np.asarray(out.logprobs[b, :k]), ref["output_logprob"][b, :k], atol=1e-4)
    if case == "llama_gqa":
        assert ref["output_len"].tolist() == [7, 24, 24]    # the eos path really is exercised


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_params_with_a_fine_tuning_delta_decode_through_the_same_trunk(model, kind):
    """A LoRA / adapter delta attached to params is applied by the trunk when generating too."""
    from jaxllm.config import AdapterConfig, LoraConfig
    from jaxllm.model import adapter, lora
    cfg, params = model
    lib, dcfg = (lora, LoraConfig(r=4)) if kind == "lora" else (adapter, AdapterConfig(size=8))
    delta = lib.init_delta(params, dcfg, jax.random.key(2))
    # B / up start at zero (no change at init); make the delta matter
    delta = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), delta)
    tuned = lib.attach(params, delta, dcfg)
    out = generate(tuned, PROMPTS, cfg, max_new_tokens=8, key=jax.random.key(0), eos_id=None, pad_id=0)
    base = generate(params, PROMPTS, cfg, max_new_tokens=8, key=jax.random.key(0), eos_id=None, pad_id=0)
    assert (np.asarray(out.tokens) != np.asarray(base.tokens)).any()
    for b, prompt in enumerate(PROMPTS):
        assert np.asarray(out.tokens[b]).tolist() == greedy_by_forward(tuned, cfg, prompt, 8), b
        ref = forward_logprobs(tuned, cfg, prompt, np.asarray(out.tokens[b]).tolist(), 1.0)
        np.testing.assert_allclose(np.asarray(out.logprobs[b]), ref, atol=LOGPROB_ATOL, rtol=0)


# ------------------------------------------------------------------ sampling
LOGITS = jnp.log(jnp.asarray([[0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.03]], jnp.float32))
P = np.asarray(jax.nn.softmax(LOGITS[0]))


def draws(n=20000, **settings):
    keys = jax.random.split(jax.random.key(42), n)
    tok, lp = jax.vmap(lambda k: sample_logits(LOGITS, k, **settings))(keys)
    return np.asarray(tok[:, 0]), np.asarray(lp[:, 0])


def test_fixed_key_gives_identical_samples_and_another_key_others(model):
    cfg, params = model
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, eos_id=None, pad_id=0)
    a = generate(params, PROMPTS, cfg, key=jax.random.key(7), **kw)
    b = generate(params, PROMPTS, cfg, key=jax.random.key(7), **kw)
    c = generate(params, PROMPTS, cfg, key=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_plain_sampling_follows_the_distribution():
    tok, lp = draws(temperature=1.0)
    freq = np.bincount(tok, minlength=8) / len(tok)
    np.testing.assert_allclose(freq, P, atol=0.015)             # 20000 draws: std <= 0.0036
    np.testing.assert_allclose(lp, np.log(P[tok]), atol=1e-5)


def test_top_k_never_samples_outside_the_top_k_and_keeps_their_proportions():
    tok, lp = draws(temperature=1.0, top_k=3)
    assert set(tok.tolist()) == {0, 1, 2}
    freq = np.bincount(tok, minlength=8)[:3] / len(tok)
    np.testing.assert_allclose(freq, P[:3] / P[:3].sum(), atol=0.015)
    np.testing.assert_allclose(lp, np.log(P[tok]), atol=1e-5)   # log-prob of the full distribution


def test_top_p_never_samples_outside_the_nucleus():
    # cumulative mass 0.30, 0.55, 0.70, 0.80, ...: the nucleus of 0.6 is the first three tokens
    tok, _ = draws(temperature=1.0, top_p=0.6)
    assert set(tok.tolist()) == {0, 1, 2}
    freq = np.bincount(tok, minlength=8)[:3] / len(tok)
    np.testing.assert_allclose(freq, P[:3] / P[:3].sum(), atol=0.015)
    # top_p smaller than the best token's mass: only that token
    assert set(draws(n=200, temperature=1.0, top_p=0.1)[0].tolist()) == {0}
    # top_k then top_p over the renormalised top-k: {0, 1} hold 0.55/0.70 = 0.79 of top-3
    assert set(draws(temperature=1.0, top_k=3, top_p=0.75)[0].tolist()) == {0, 1}


def test_temperature_sharpens_and_greedy_is_argmax():
    tok, lp = draws(temperature=0.25)
    sharp = P ** 4 / (P ** 4).sum()
    np.testing.assert_allclose(np.bincount(tok, minlength=8) / len(tok), sharp, atol=0.015)
    np.testing.assert_allclose(lp, np.log(sharp[tok]), atol=1e-5)
    tok, lp = draws(n=10, temperature=0.0)
    assert (tok == 0).all()
    np.testing.assert_allclose(lp, np.log(P[0]), atol=1e-6)


def test_stream_yields_the_tokens_generate_returns(model):
    cfg, params = model
    kw = dict(max_new_tokens=10, key=jax.random.key(5), temperature=0.9, top_k=20)
    out = generate(params, [PROMPTS[0]], cfg, eos_id=None, pad_id=0, **kw)
    assert list(stream(params, PROMPTS[0], cfg, eos_id=None, **kw)) == np.asarray(out.tokens[0]).tolist()
    eos = int(out.tokens[0, 4])
    first = np.asarray(out.tokens[0]).tolist().index(eos)
    assert list(stream(params, PROMPTS[0], cfg, eos_id=eos, **kw)) == np.asarray(out.tokens[0, :first + 1]).tolist()


def test_generate_can_be_jitted_by_its_caller(model):
    cfg, params = model
    tokens, mask = left_pad(PROMPTS, 0)
    static = ("model_cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id", "stop_ids")
    jitted = jax.jit(generate, static_argnames=static)
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=5, eos_id=1, pad_id=0, stop_ids=(2,))
    a = jitted(params, jnp.asarray(tokens), model_cfg=cfg, prompt_mask=jnp.asarray(mask), key=jax.random.key(1), **kw)
    b = generate(params, PROMPTS, cfg, key=jax.random.key(1), **kw)
    assert isinstance(a, Generation)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ sharding
def test_sharded_generation_equals_single_device(model):
    assert len(jax.devices()) == 8, "conftest must give 8 CPU devices"
    cfg, params = model
    prompts = PROMPTS + [[40, 41, 42, 43]]           # batch 4: divisible by data * fsdp
    kw = dict(max_new_tokens=10, eos_id=None, pad_id=0)
    single_greedy = generate(params, prompts, cfg, key=jax.random.key(0), **kw)
    single_sampled = generate(params, prompts, cfg, key=jax.random.key(9), temperature=1.0, top_p=0.9, **kw)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2, preset="fsdp_tp")
    mesh, rules = mesh_lib.make_mesh(mesh_cfg), rules_lib.logical_rules(mesh_cfg)
    shardings = rules_lib.param_shardings(jaxllm.param_logical_axes(cfg), params, rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        placed = jax.device_put(params, shardings)
        assert "tensor" in placed["layers"]["attn"]["q"]["kernel"].sharding.spec
        assert "fsdp" in placed["layers"]["attn"]["q"]["kernel"].sharding.spec
        greedy = generate(placed, prompts, cfg, key=jax.random.key(0), **kw)
        sampled = generate(placed, prompts, cfg, key=jax.random.key(9), temperature=1.0, top_p=0.9, **kw)
        odd = generate(placed, PROMPTS, cfg, key=jax.random.key(0), **kw)   # 3 rows on 4 batch shards
    for got, want in ((greedy, single_greedy), (sampled, single_sampled)):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_array_equal(odd.tokens, single_greedy.tokens[:3])


# ------------------------------------------------------------------ bad input
def test_bad_requests_fail_with_a_message_naming_the_problem(model):
    cfg, params = model
    kw = dict(key=jax.random.key(0), eos_id=None, pad_id=0)
    cases = [
        (dict(prompts=[list(range(1, 60))], max_new_tokens=10),
         r"prompt 0 \(59 tokens\) \+ max_new_tokens=10 = 69 tokens exceeds the model's max_seq_len=64"),
        (dict(prompts=[[1, 2], []], max_new_tokens=4), r"prompt 1 is empty"),
        (dict(prompts=[], max_new_tokens=4), r"no prompts given"),
        (dict(prompts=[[1, 2]], max_new_tokens=0), r"max_new_tokens must be a positive integer, got 0"),
        (dict(prompts=[[1, 2]], max_new_tokens=-3), r"max_new_tokens must be a positive integer, got -3"),
        (dict(prompts=[[1, 200]], max_new_tokens=4), r"token id 200 outside the model's vocabulary \[0, 96\)"),
        (dict(prompts=[[1, 2]], max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(prompts=[[1, 2]], max_new_tokens=4, top_k=500), r"top_k must be in \[0, vocab_size=96\]"),
        (dict(prompts=[[1, 2]], max_new_tokens=4, temperature=-1.0), r"temperature must be >= 0"),
        (dict(prompts=np.asarray([[1, 2, 3]]), prompt_mask=np.asarray([[1, 0, 1]]), max_new_tokens=4),
         r"prompt 0 is not left-padded"),
        (dict(prompts=np.asarray([[1, 2, 3]]), prompt_mask=np.asarray([[0, 0, 0]]), max_new_tokens=4),
         r"prompt 0 is empty"),
    ]
    for args, message in cases:
        with pytest.raises(GenerationError, match=message):
            generate(params, model_cfg=cfg, **{**kw, **args})
    assert issubclass(GenerationError, jaxllm.UserError)      # the CLI prints it as one line, exit 2
    # at the limit exactly, it runs
    out = generate(params, [list(range(1, 55))], cfg, max_new_tokens=10, **kw)
    assert np.asarray(out.mask).sum() == 10

