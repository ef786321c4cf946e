"""model.matmul=blas: the projections' fp32 GEMMs through OpenBLAS (jaxllm/model/cpu_gemm.py).

The kernel is an XLA FFI custom call built on first use; these tests build it (the cpublas
extra and a C++ compiler are part of the set-up, so a missing one fails here rather than
skipping) and check it against float64 numpy, against XLA's own dot, through autodiff, and in
a train step; then the refusals."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.data.tokens import synthetic_batches
from jaxllm.model import cpu_gemm
from jaxllm.model.attention import attention
from jaxllm.model.matmul import mixed_matmul
from jaxllm.objectives import make_clm_loss

FP32_REL = 2e-6     # one fp32 GEMM vs a float64 reference: summation-order rounding only


def _ref(a, b, ta, tb):
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a64.T if ta else a64) @ (b64.T if tb else b64)


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (130, 70, 33), (256, 128, 300), (1, 64, 1)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_sgemm_equals_a_float64_product_in_every_layout(m, k, n, ta, tb):
    rng = np.random.default_rng(m * 7 + n)
    a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    got = np.asarray(jax.jit(lambda x, y: cpu_gemm.sgemm(x, y, ta, tb))(a, b))
    ref = _ref(a, b, ta, tb)
    # the error scale of a k-term fp32 sum is |a||b| row/column norms; bound elementwise by it
    scale = np.sqrt(k) * np.abs(a).max() * np.abs(b).max()
    np.testing.assert_array_less(np.abs(got - ref), 8 * FP32_REL * scale)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_sgemm_splits_a_large_product_into_blocks_without_losing_an_edge(ta, tb):
    """Products above the one-piece size, not multiples of the 16-wide blocks, on both split
    sides (n >= m splits columns, m > n rows), in every layout: each block's pointer offsets
    differ per layout, and every output cell must be written (a missed edge stays garbage)."""
    rng = np.random.default_rng(1)
    for m, k, n in [(517, 300, 2049), (2051, 300, 517)]:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        got = np.asarray(jax.jit(lambda x, y: cpu_gemm.sgemm(x, y, ta, tb))(a, b))
        np.testing.assert_allclose(got, _ref(a, b, ta, tb), rtol=1e-4, atol=1e-3)


def test_empty_products():
    """k = 0 is an empty sum (zeros), m = 0 an empty result."""
    got = jax.jit(cpu_gemm.sgemm)(jnp.ones((3, 0)), jnp.ones((0, 4)))
    np.testing.assert_array_equal(got, np.zeros((3, 4), np.float32))
    assert jax.jit(cpu_gemm.sgemm)(jnp.ones((0, 5)), jnp.ones((5, 4))).shape == (0, 4)


@pytest.mark.parametrize("n_in,shapes", [(1, ((2, 9, 24), (24, 3, 8))),      # q projection
                                         (2, ((2, 9, 3, 8), (3, 8, 24)))])    # attention output
def test_blas_matmul_equals_xla_value_and_gradients(n_in, shapes):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shapes[0])
    w = jax.random.normal(kw, shapes[1])
    out_shape = shapes[0][:x.ndim - n_in] + shapes[1][n_in:]
    g = jax.random.normal(kg, out_shape)
    outs = {}
    for kernel in ("xla", "blas"):
        y, vjp = jax.vjp(lambda x, w, kernel=kernel: mixed_matmul(x, w, n_in, jnp.float32, kernel), x, w)
        outs[kernel] = (y, *vjp(g))
    for ref, got in zip(outs["xla"], outs["blas"]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _masks(case: str, b: int, t: int, s: int) -> dict:
    if case == "plain":
        return {}
    if case == "packed":        # documents crossing the kernel's 64-query/64-key blocks, then padding
        seg = np.zeros((b, t), np.int32)
        seg[0, :70], seg[0, 70:130] = 1, 2
        seg[1, :] = 3
        return dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg))
    if case == "unseen":        # queries 60.. of row 0 are of a segment no key has: they see nothing
        q_seg, kv_seg = np.ones((b, t), np.int32), np.ones((b, s), np.int32)
        q_seg[0, 60:], kv_seg[0, 60:] = 5, 3
        return dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    if case == "random":        # segments and positions in no order (interleaved documents)
        rng = np.random.default_rng(t)
        seg = rng.integers(0, 3, (b, t)).astype(np.int32)
        pos = np.stack([rng.permutation(t) for _ in range(b)]).astype(np.int32)
        return dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                    q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos))
    if case == "cache":         # t new queries at slots 100.. of an s-slot cache; slots after them empty
        q_pos = jnp.broadcast_to(100 + jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        kv_seg = jnp.broadcast_to((jnp.arange(s) < 100 + t).astype(jnp.int32), (b, s))
        return dict(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=jnp.ones((b, t), jnp.int32),
                    kv_segment_ids=kv_seg)
    raise ValueError(case)


@pytest.mark.parametrize("t,s,case,causal,heads", [
    (9, 9, "plain", True, (12, 3, 8)), (3, 11, "plain", True, (12, 3, 8)),
    (20, 9, "plain", True, (12, 3, 8)),      # T > S: the first 11 queries see no key
    (150, 150, "plain", True, (12, 3, 8)), (150, 150, "plain", False, (12, 3, 8)),
    (129, 129, "plain", True, (12, 3, 8)),   # query 128 alone sees key block [128, 129)
    (150, 150, "packed", True, (12, 3, 8)), (150, 150, "unseen", False, (12, 3, 8)),
    (150, 150, "unseen", True, (12, 3, 8)), (3, 200, "cache", True, (12, 3, 8)),
    (90, 90, "random", True, (12, 3, 8)), (90, 90, "random", False, (12, 3, 8)),
    (100, 100, "packed", True, (4, 4, 64)),  # no grouping (G = 1), a real head size
    (100, 100, "plain", True, (4, 1, 64))])  # one kv head (K = 1)
@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_blas_attention_equals_xla_attention_value_and_gradients(t, s, case, causal, heads, implementation):
    """The fused CPU kernel (kernels/cpu_attention.cc) against XLA's reference attention, value
    and dq/dk/dv: GQA (12 query heads over 3 kv heads), causal and not, packed documents whose
    edges fall inside the kernel's blocks (whole key blocks skipped), queries that see no key
    (the reference gives them the mean of v; they pass no gradient to q or k), fewer queries
    than keys and more, a decode step over a half-empty cache, segments and positions in no
    order. Batch, kv heads, group and head sizes differ, so a stride taken from the wrong one
    fails."""
    b, (n, kv, h) = 2, heads
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (b, t, n, h))
    k = jax.random.normal(ks[1], (b, s, kv, h))
    v = jax.random.normal(ks[2], (b, s, kv, h))
    g = jax.random.normal(ks[3], (b, t, n, h))
    kw = dict(_masks(case, b, t, s), causal=causal)
    outs = {}
    for kernel, impl in (("xla", "xla"), ("blas", implementation)):
        f = jax.jit(lambda q, k, v, kernel=kernel, impl=impl: attention(
            q, k, v, matmul=kernel, implementation=impl, block=32, **kw))
        y, vjp = jax.vjp(f, q, k, v)
        outs[kernel] = (y, *vjp(g))
    for ref, got in zip(outs["xla"], outs["blas"]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)
    if case == "unseen":        # the case is what it says: those queries get the mean of v
        np.testing.assert_allclose(outs["blas"][0][0, 60:, :kv * (n // kv):n // kv],
                                   np.broadcast_to(v[0].mean(0), (t - 60, kv, h)), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("t,s,case,batch,heads,splits", [
    (150, 150, "plain", 1, (6, 1, 8), 3),      # one kv head: units dealt over 3 parts
    (150, 150, "packed", 2, (12, 3, 8), 2),
    (150, 150, "unseen", 1, (4, 2, 8), 8),     # more parts than some heads have units
    (20, 9, "plain", 1, (2, 1, 8), 5),         # 2 units (G 2 x 1 block): capped at 2 parts
    (100, 100, "plain", 1, (4, 1, 64), 0)])    # the kernel's own choice from the pool's size
def test_blas_attention_backward_split_over_parts_sums_like_one(t, s, case, batch, heads, splits, monkeypatch):
    """The backward splits a kv head's (query head, query block) units over several tasks when
    batch x kv heads would leave threads idle, each summing its own dk/dv partials, added up
    after. Forced part counts (this machine's pool decides the automatic one) must give XLA's
    gradients: a partial dropped, added twice or written at the wrong stride fails."""
    n, kv, h = heads
    monkeypatch.setattr(cpu_gemm, "BACKWARD_SPLITS", splits)
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (batch, t, n, h))
    k = jax.random.normal(ks[1], (batch, s, kv, h))
    v = jax.random.normal(ks[2], (batch, s, kv, h))
    g = jax.random.normal(ks[3], (batch, t, n, h))
    kw = dict(_masks(case, batch, t, s), causal=case != "unseen")
    outs = {}
    for kernel in ("xla", "blas"):
        f = jax.jit(lambda q, k, v, kernel=kernel: attention(q, k, v, matmul=kernel, **kw))
        y, vjp = jax.vjp(f, q, k, v)
        outs[kernel] = (y, *vjp(g))
    for ref, got in zip(outs["xla"], outs["blas"]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)

# batch 4, 2 kv heads, groups of 3, head_dim 8: distinct sizes, so a stride mix-up shows
TINY = ["model=tiny", "model.vocab_size=97", "model.d_model=48", "model.n_layers=2", "model.n_heads=6",
        "model.n_kv_heads=2", "model.d_ff=64", "model.scan_layers=false", "model.attention=xla"]


def _batch(cfg, batch: int = 4, seq: int = 16) -> dict:
    it = synthetic_batches(seq_len=seq, global_batch_size=batch, vocab_size=cfg.vocab_size, seed=0)
    return jax.tree.map(jnp.asarray, next(it))


def _losses(kernel: str, steps: int = 4) -> list[float]:
    """A few AdamW steps of the CLM loss on one device; the loss after each."""
    import optax
    cfg = jaxllm.load_config(None, [*TINY, f"model.matmul={kernel}"]).model
    params = jaxllm.init_params(cfg, jax.random.key(0))
    loss_fn = make_clm_loss(cfg)
    opt = optax.adamw(3e-3)
    opt_state = opt.init(params)
    batch = _batch(cfg)

    def mean_loss(p):
        loss_sum, sums = loss_fn(p, batch, None)
        return loss_sum / sums["weight"]

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(mean_loss)(params)
        upd, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    out = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        out.append(float(loss))
    return out


def test_training_with_blas_matmuls_follows_xla_matmuls():
    xla, blas = _losses("xla"), _losses("blas")
    assert xla[-1] < xla[0] - 0.05        # it trains
    np.testing.assert_allclose(blas, xla, rtol=2e-5)


def test_blas_needs_fp32_compute():
    with pytest.raises(ConfigError, match="model.matmul=blas runs fp32"):
        dataclasses.replace(ModelConfig(), matmul="blas", compute_dtype="bfloat16")


def test_blas_refuses_a_mesh_of_several_devices():
    """XLA's partitioner cannot split a custom call; it would gather every operand onto every
    device. Refused in one line instead."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:2])
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with jax.set_mesh(mesh), pytest.raises(cpu_gemm.BlasUnavailable, match="runs on one device"):
        jax.jit(lambda x, w: mixed_matmul(x, w, 1, jnp.float32, "blas"))(x, w)


def test_the_kernel_builds_in_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    lib = cpu_gemm._build()
    assert lib.parent == tmp_path / "cpu_gemm" and lib.stat().st_size > 0
    assert list(lib.parent.iterdir()) == [lib]      # no temporary file left behind
    built = lib.stat().st_mtime_ns, lib.stat().st_ino
    monkeypatch.setenv("CXX", "false")              # a second build would now fail
    assert cpu_gemm._build() == lib                 # built once, then reused
    assert (lib.stat().st_mtime_ns, lib.stat().st_ino) == built


def test_a_missing_or_failing_compiler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_gemm.BlasUnavailable, match="found no C.. compiler .*no-such-compiler"):
        cpu_gemm._build()
    monkeypatch.setenv("CXX", "false")          # a "compiler" that fails
    with pytest.raises(cpu_gemm.BlasUnavailable, match="compiling cpu_sgemm.cc, cpu_attention.cc failed"):
        cpu_gemm._build()
    assert not any(tmp_path.rglob("*.so"))      # nothing half-written is left for a later run


def test_every_matmul_of_the_step_is_a_blas_call():
    """The option reaches the gradient's jitted program as custom calls, for the projections,
    the LM head and attention."""
    cfg = jaxllm.load_config(None, [*TINY, "model.matmul=blas"]).model
    params = jaxllm.init_params(cfg, jax.random.key(0))
    batch = _batch(cfg, 2, 8)
    loss_fn = make_clm_loss(cfg)
    with nn.logical_axis_rules(()):
        hlo = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0])).lower(params).as_text()
    # per layer q, k, v, o, gate, up, down; plus the LM head: forward + 2 backward GEMMs each
    assert hlo.count(f"@{cpu_gemm.TARGET}(") == 3 * (7 * cfg.n_layers + 1)
    # attention: one fused call forward and one backward per layer
    assert hlo.count(f"@{cpu_gemm.TARGET_ATTENTION_FWD}(") == cfg.n_layers
    assert hlo.count(f"@{cpu_gemm.TARGET_ATTENTION_BWD}(") == cfg.n_layers
    assert "dot_general" not in hlo


def test_a_run_on_several_devices_is_refused_before_it_writes_anything(tmp_path):
    from jaxllm.training.run import Run
    cfg = jaxllm.load_config(None, [*TINY, "model.matmul=blas", "mesh.devices=2",
                                    f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(cpu_gemm.BlasUnavailable, match="mesh here has 2"):
        Run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_blas_run_loads_with_xla_matmuls_off_cpu(monkeypatch, capsys):
    """generate/chat/eval of a run trained with model.matmul=blas on a GPU/TPU: the kernel is a
    CPU choice, not part of the model, so the loader swaps in XLA's matmuls and says so."""
    from jaxllm.evaluation.source import model_config
    saved = dataclasses.asdict(dataclasses.replace(ModelConfig(), matmul="blas"))
    assert model_config(dict(saved), "run").matmul == "blas"            # on CPU: kept
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model_config(dict(saved), "run").matmul == "xla"
    assert "trained with model.matmul=blas" in capsys.readouterr().err


def test_remat_dots_keeps_the_blas_attention_output():
    """model.remat=dots saves every matmul output; the fused attention's output and log-sum-exp
    (what its backward needs) are named for it, so the backward does not rerun the forward
    kernel: one forward call per layer; remat=full reruns it (two)."""
    def forward_calls(remat):
        cfg = jaxllm.load_config(None, [*TINY, "model.matmul=blas", f"model.remat={remat}"]).model
        params = jaxllm.init_params(cfg, jax.random.key(0))
        batch = _batch(cfg, 2, 8)
        loss_fn = make_clm_loss(cfg)
        hlo = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0])).lower(params).as_text()
        assert hlo.count(f"@{cpu_gemm.TARGET_ATTENTION_BWD}(") == cfg.n_layers
        return hlo.count(f"@{cpu_gemm.TARGET_ATTENTION_FWD}("), cfg.n_layers
    dots, layers = forward_calls("dots")
    full, _ = forward_calls("full")
    assert (dots, full) == (layers, 2 * layers)


@pytest.mark.parametrize("segments", [False, True])
def test_a_masked_key_with_a_huge_score_passes_no_gradient(segments):
    """A key a query may not see can score far above the ones it does (a future token, another
    document): the backward's recomputed probabilities must still be exactly 0 there, not
    exp(score - lse) overflowing to inf (inf * 0 = NaN). Found in review: score - lse = 88.7."""
    q = jnp.ones((1, 2, 1, 1))
    k = jnp.array([0.0, 88.7]).reshape(1, 2, 1, 1)
    v = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
    kw = (dict(causal=False, q_segment_ids=jnp.array([[1, 2]]), kv_segment_ids=jnp.array([[1, 2]]))
          if segments else dict(causal=True))
    grads = {}
    for kernel in ("xla", "blas"):
        def f(q, k, v, kernel=kernel):
            return attention(q, k, v, matmul=kernel, **kw).sum()
        grads[kernel] = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    for ref, got in zip(grads["xla"], grads["blas"]):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_mismatched_attention_operands_are_refused_not_read_out_of_bounds():
    q = jnp.ones((2, 5, 3, 2, 8))
    k = v = jnp.ones((2, 5, 3, 8))
    pos, seg = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="k has shape"):        # 2 kv heads, q has 3
        cpu_gemm.fused_attention(q, jnp.ones((2, 5, 2, 8)), v, (pos, pos, seg, seg), True)
    with pytest.raises(ValueError, match="v has shape"):        # head size 4, q has 8
        cpu_gemm.fused_attention(q, k, jnp.ones((2, 5, 3, 4)), (pos, pos, seg, seg), True)
    with pytest.raises(ValueError, match="kv_segment_ids has shape"):
        cpu_gemm.fused_attention(q, k, v, (pos, pos, seg, jnp.zeros((2, 4), jnp.int32)), True)
    with pytest.raises(ValueError, match="q_positions must be integers"):
        cpu_gemm.fused_attention(q, k, v, (pos.astype(jnp.float32), pos, seg, seg), True)
    with pytest.raises(ValueError, match="no keys"):
        empty = jnp.ones((2, 0, 3, 8))
        cpu_gemm.fused_attention(q, empty, empty, (pos, pos[:, :0], seg, seg[:, :0]), True)
