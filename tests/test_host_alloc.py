"""jaxllm.host_alloc: XLA:CPU's per-execution buffers reuse warm pages instead of being mmapped,
page-faulted and unmapped on every call (what `jaxllm train` sets up before its first step)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from jaxllm import host_alloc
from jaxllm.errors import UserError

# A jitted backward whose temporaries (~117 MB) are far above glibc's largest mmap threshold
# (32 MB): with glibc's defaults each call maps and faults them in afresh. A narrow matmul keeps
# each call short (~0.1-0.2 s here) so that the window below can be long.
CHILD = r"""
import json, resource, sys
from jaxllm import host_alloc
line = host_alloc.keep_pages()
import jax, jax.numpy as jnp
def loss(w, x):
    h = x
    for _ in range(6):
        h = jnp.tanh(h @ w)
    return jnp.sum(h)
g = jax.jit(jax.grad(loss))
w = jnp.full((64, 64), 1e-3); x = jnp.ones((65536, 64))
temp = g.lower(w, x).compile().memory_analysis().temp_size_in_bytes
# Warm-up: the kept heap grows while it settles. Small allocations land in the freed blocks'
# space, so a new block sometimes does not fit and the heap grows (fresh pages, faults); a
# 25m train step settles by its third step, this toy backward mostly within ~10 calls, with a
# rare growth later (seen at call 36 of 40).
for _ in range(10):
    jax.block_until_ready(g(w, x))
faults = []
for _ in range(21):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(g(w, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"line": line, "temp_pages": temp / 4096, "faults": faults}))
"""


def _child(mode: str) -> dict:
    env = dict(os.environ, JAXLLM_HOST_ALLOC=mode, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)   # one device: one execution thread pool, as a plain run has
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt")
def test_kept_pages_stop_the_per_call_page_faults():
    default, keep = _child("default"), _child("keep")
    pages = default["temp_pages"]
    assert pages > 20_000, default                          # the test's premise: > 80 MB of temporaries
    assert "glibc defaults" in default["line"] and "main heap only" in keep["line"], (default, keep)
    med = {k: sorted(r["faults"])[len(r["faults"]) // 2] for k, r in (("default", default), ("keep", keep))}
    # glibc's defaults fault in (nearly) every temporary page on every call; kept pages do not,
    # but for a rare heap growth (median over 21 calls: a growth would need 11 of them to fail).
    assert med["default"] > 0.5 * pages, default
    assert med["keep"] < 0.05 * pages, (keep, default)
    assert sum(keep["faults"]) < 0.25 * sum(default["faults"]), (keep, default)


def test_a_wrong_mode_is_refused(monkeypatch):
    monkeypatch.setattr(host_alloc, "_done", None)
    monkeypatch.setenv(host_alloc.ENV, "yes")
    with pytest.raises(UserError, match="JAXLLM_HOST_ALLOC='yes'.*'keep'.*'default'"):
        host_alloc.keep_pages()


def test_accelerator_hosts_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_alloc, "_done", None)
    monkeypatch.delenv(host_alloc.ENV, raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_alloc, "_accelerator_plugin", lambda: "jax_cuda12_plugin")
    monkeypatch.setattr(host_alloc.ctypes, "CDLL", lambda *a: pytest.fail("mallopt called on a GPU host"))
    assert host_alloc.keep_pages().startswith("host allocator: unchanged (jax_cuda12_plugin is installed")
