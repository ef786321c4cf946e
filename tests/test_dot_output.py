"""model.dot_output=compute: every matmul writes the compute dtype (bf16), as torch autocast
does, which on CPU is what reaches oneDNN's AMX kernel; jaxllm/xla_flags.py sets the flags
for that kernel. Numerics here run with the default flags: the setting's meaning does not
depend on which kernel runs it."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import xla_flags
from jaxllm.config import ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.model.attention import attention
from jaxllm.model.matmul import mixed_matmul
from jaxllm.objectives import make_clm_loss

BF16_EPS = 2.0 ** -8          # half an ulp of bf16, relative: one rounding to bf16
BASE = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   compute_dtype="bfloat16")
COMPUTE = dataclasses.replace(BASE, dot_output="compute")


def _rounded_once(got, ref_f32):
    """got (bf16) is ref (fp32) rounded to bf16 once: within half an ulp (plus the last bit an
    other accumulation order may flip)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref_f32, np.float32)
    np.testing.assert_array_less(np.abs(got - ref), 2 * BF16_EPS * np.abs(ref) + 1e-6)


def test_mixed_matmul_writes_the_operand_dtype_rounded_once_forward_and_backward():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 7, 64), jnp.bfloat16)
    w = jax.random.normal(kw, (64, 4, 16), jnp.bfloat16)
    g = jax.random.normal(kg, (3, 7, 4, 16), jnp.bfloat16)
    y32, vjp32 = jax.vjp(lambda x, w: mixed_matmul(x, w, 1), x, w)
    y16, vjp16 = jax.vjp(lambda x, w: mixed_matmul(x, w, 1, jnp.dtype(jnp.bfloat16)), x, w)
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    _rounded_once(y16, y32)
    assert not np.array_equal(np.asarray(y32), np.asarray(y16, np.float32))   # it did round
    (dx32, dw32), (dx16, dw16) = vjp32(g.astype(jnp.float32)), vjp16(g)
    assert dx16.dtype == dw16.dtype == jnp.bfloat16
    # the backward rounded dx, dw to bf16 before as well: the same values
    _rounded_once(dx16, dx32)
    _rounded_once(dw16, dw32)


def _dot_outputs(fn, *args) -> list[tuple[str, str]]:
    """(operand dtype, output dtype) of every dot_general in fn's jaxpr, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((str(eqn.invars[0].aval.dtype), str(eqn.outvars[0].aval.dtype)))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else [p]):
                    if isinstance(sub, jex_core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex_core.Jaxpr):
                        walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _batch(b=2, t=24):
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, BASE.vocab_size)
    seg = jnp.array([[1] * 9 + [2] * 15, [1] * 20 + [0] * 4])
    pos = jnp.array([list(range(9)) + list(range(15)), list(range(20)) + [0] * 4])
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": (seg > 0).astype(jnp.int32)}


@pytest.mark.parametrize("attn", ["xla", "blockwise"])
def test_every_bf16_dot_of_the_training_gradient_writes_bf16(attn):
    """The AMX kernel takes only bf16-output dots; an fp32-output one left in the step would run
    on oneDNN's slower fp32 path. So: forward, backward, LM head and attention, all bf16-out."""
    params = jaxllm.init_params(BASE, jax.random.key(0))
    batch = _batch()

    def dots(cfg):
        cfg = dataclasses.replace(cfg, attention=attn, attention_block=8, logits_chunk=8)
        return _dot_outputs(jax.grad(lambda p: make_clm_loss(cfg)(p, batch, None)[0]), params)
    on, off = dots(COMPUTE), dots(BASE)
    bf16_in_on = [o for i, o in on if i == "bfloat16"]
    assert len(bf16_in_on) >= 20, on                    # projections, head and attention, both passes
    assert set(bf16_in_on) == {"bfloat16"}, on
    assert "float32" in {o for i, o in off if i == "bfloat16"}   # the default does write fp32


@pytest.mark.parametrize("attn", ["xla", "blockwise"])
def test_loss_and_gradients_stay_close_to_fp32_dot_outputs(attn):
    params = jaxllm.init_params(BASE, jax.random.key(0))
    batch = _batch()

    def run(cfg):
        cfg = dataclasses.replace(cfg, attention=attn, attention_block=8, logits_chunk=8)
        return jax.jit(jax.value_and_grad(lambda p: make_clm_loss(cfg)(p, batch, None)[0]))(params)
    (l32, g32), (l16, g16) = run(BASE), run(COMPUTE)
    # bf16 logits: each rounded by <= 2^-9 relative; the summed loss moves by far less than 1%
    assert abs(float(l16) - float(l32)) < 1e-3 * abs(float(l32)), (l16, l32)
    assert float(l16) != float(l32)             # the logits were rounded: not a no-op
    flat32, flat16 = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]) for g in (g32, g16))
    cos = flat16 @ flat32 / np.linalg.norm(flat16) / np.linalg.norm(flat32)
    assert cos > 0.999, cos


def test_forward_logits_are_bf16_values_returned_as_fp32():
    params = jaxllm.init_params(BASE, jax.random.key(0))
    x = _batch()["tokens"]
    on, off = jaxllm.forward(params, x, COMPUTE), jaxllm.forward(params, x, BASE)
    assert on.dtype == off.dtype == jnp.float32
    np.testing.assert_array_equal(on, on.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(off, off.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(on, off, atol=0.02 * float(jnp.max(jnp.abs(off))))


def test_attention_with_bf16_scores_matches_blockwise_and_the_fp32_reference():
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (2, 40, 4, 16), jnp.bfloat16)
    k = jax.random.normal(kk, (2, 40, 2, 16), jnp.bfloat16)
    v = jax.random.normal(kv, (2, 40, 2, 16), jnp.bfloat16)
    bf = jnp.dtype(jnp.bfloat16)
    ref = attention(q, k, v).astype(jnp.float32)
    xla = attention(q, k, v, dot_dtype=bf).astype(jnp.float32)
    blk = attention(q, k, v, implementation="blockwise", block=16, dot_dtype=bf).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(xla, ref, atol=0.03 * scale)
    np.testing.assert_allclose(blk, xla, atol=0.03 * scale)


def test_compute_dot_output_with_fp32_compute_is_refused():
    with pytest.raises(ConfigError, match="dot_output=compute makes matmuls write the compute dtype"):
        ModelConfig(dot_output="compute")


# ---------------------------------------------------------------------------- the XLA flags
@pytest.fixture
def new_jax(monkeypatch):
    """As in a fresh process on a jax whose oneDNN has the AMX path (>= 0.12), on a CPU with AMX."""
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(xla_flags, "_jax_version", lambda: xla_flags.MIN_JAX)
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"avx2", "avx512_bf16", "amx_bf16", "amx_tile"})


def test_flags_are_added_only_for_compute_dot_output(new_jax):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply(BASE, env) is None
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    line = xla_flags.apply(COMPUTE, env)
    assert line.startswith("XLA flags: added --xla_cpu_experimental_onednn_custom_call=true")
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                        "--xla_cpu_experimental_onednn_custom_call=true",
                                        "--xla_cpu_experimental_ynn_fusion_type=reduce"]


def test_a_flag_the_user_set_is_kept(new_jax):
    env = {"XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=false"}
    line = xla_flags.apply(COMPUTE, env)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_experimental_onednn_custom_call=false",
                                        "--xla_cpu_experimental_ynn_fusion_type=reduce"]
    assert "kept your --xla_cpu_experimental_onednn_custom_call" in line


def test_a_started_backend_is_said_in_one_line_and_the_env_left_alone(monkeypatch):
    monkeypatch.setattr(xla_flags, "_jax_version", lambda: xla_flags.MIN_JAX)
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"amx_bf16"})
    jax.devices()                                   # this test process's backend is up
    env = {}
    line = xla_flags.apply(COMPUTE, env)
    assert env == {} and line.startswith("XLA flags: NOT applied") and "\n" not in line


def test_an_older_jax_gets_no_flags_and_is_told_why(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(xla_flags, "_jax_version", lambda: (0, 10))
    env = {}
    line = xla_flags.apply(COMPUTE, env)
    assert env == {} and "runs bf16 dots as fp32 GEMMs" in line


def test_a_cpu_without_amx_gets_no_flags_and_is_told_why(new_jax, monkeypatch):
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"avx2", "fma"})     # e.g. an AMD EPYC (Zen 3)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    line = xla_flags.apply(COMPUTE, env)
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert "no AMX" in line and "\n" not in line


def test_cpu_features_reads_this_host():
    feats = xla_flags.cpu_features()
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert {"sse2", "avx"} <= feats           # every x86-64 host jax runs on has these
    assert all(isinstance(f, str) and f for f in feats)


CHILD = r"""
import os, sys
from jaxllm import xla_flags
if sys.argv[1] == "on":      # the flags themselves, whatever this CPU (apply() also checks for AMX)
    os.environ["XLA_FLAGS"] = " ".join(f"{k}={v}" for k, v in xla_flags.AMX_DOTS.items())
import jax, jax.numpy as jnp
a = jnp.ones((256, 256), jnp.bfloat16)
jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.bfloat16))(a).block_until_ready()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="oneDNN's verbose log as jaxlib ships it on Linux x86")
@pytest.mark.skipif(xla_flags._jax_version() < xla_flags.MIN_JAX, reason="no flags before jax 0.12")
def test_the_flags_send_bf16_dots_to_onednn():
    """What the flags are for, seen from oneDNN itself: with them a bf16 dot is a oneDNN matmul,
    on a CPU with AMX an AMX kernel that writes bf16; without them oneDNN is never called. On a CPU
    without AMX, oneDNN runs it as an fp32 GEMM: why apply() sets no flags there."""
    def onednn_lines(mode):
        env = dict(os.environ, ONEDNN_VERBOSE="1", JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [ln for ln in out.stdout.splitlines() if ln.startswith("onednn_verbose,v1,primitive,exec")]
    on = [ln for ln in onednn_lines("on") if ",matmul," in ln]
    assert on, "oneDNN ran no matmul"
    if "amx_bf16" in xla_flags.cpu_features():
        assert any("amx" in ln and "dst:bf16" in ln for ln in on), on
    else:       # if a oneDNN release adds a bf16 path here, apply()'s AMX-only rule needs measuring again
        assert all("src:f32" in ln for ln in on), on
    assert not onednn_lines("off")


def test_fine_tuning_with_compute_dot_output_starts_from_a_base_trained_without(tmp_path, capsys, monkeypatch):
    """dot_output changes numerics, not the model: init_from accepts it, and `jaxllm.train` says
    in one line that this process's backend (already up in a test) runs without the flags."""
    args = ["model=tiny", "train.batch_size=4", "train.seq_len=32", "train.eval_every=0",
            "train.progress=false", "mesh.devices=1", "train.steps=1"]
    jaxllm.train(jaxllm.load_config(None, args + [f"train.run_dir={tmp_path}/base"]))
    monkeypatch.setattr(xla_flags, "_jax_version", lambda: xla_flags.MIN_JAX)
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"amx_bf16"})
    s = jaxllm.train(jaxllm.load_config(None, args + [
        "model.compute_dtype=bfloat16", "model.dot_output=compute",
        f"checkpoint.init_from={tmp_path}/base", f"train.run_dir={tmp_path}/ft"]))
    assert np.isfinite(s["final_loss"])
    assert "XLA flags: NOT applied" in capsys.readouterr().out


def test_a_16_bit_compute_dtype_on_a_cpu_without_bf16_instructions_is_said(monkeypatch):
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"avx2", "fma"})
    line = xla_flags.cpu_dtype_note(ModelConfig(compute_dtype="bfloat16"), "cpu")
    assert "without bf16 instructions" in line and "slower here than with float32" in line
    assert xla_flags.cpu_dtype_note(ModelConfig(), "cpu") is None              # fp32: nothing to say
    assert xla_flags.cpu_dtype_note(ModelConfig(compute_dtype="bfloat16"), "gpu") is None
    for feats in ({"avx512_bf16"}, {"amx_bf16"}, set()):                        # bf16 hardware, or unknown
        monkeypatch.setattr(xla_flags, "cpu_features", lambda feats=feats: feats)
        assert xla_flags.cpu_dtype_note(ModelConfig(compute_dtype="bfloat16"), "cpu") is None


def test_a_training_run_says_it_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(xla_flags, "cpu_features", lambda: {"avx2", "fma"})
    args = ["model=tiny", "train.batch_size=2", "train.seq_len=16", "train.eval_every=0",
            "train.progress=false", "mesh.devices=1", "train.steps=1", "model.compute_dtype=bfloat16",
            f"train.run_dir={tmp_path}"]
    jaxllm.train(jaxllm.load_config(None, args))
    err = capsys.readouterr().err
    assert err.count("on a CPU without bf16 instructions") == 1, err[-2000:]
