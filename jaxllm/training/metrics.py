"""Run-directory metrics: metrics.jsonl (one JSON object per logged step), TensorBoard, MFU."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B): 6N for the matmuls of N non-embedding-lookup
    parameters, plus 12 * L * heads * head_dim * T for attention scores and values."""
    h, n, k = cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
    per_layer = cfg.d_model * h * (2 * n + 2 * k) + 3 * cfg.d_model * cfg.d_ff
    matmul_params = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size  # + LM head
    mult = 3 if training else 1
    return mult * (2 * matmul_params + 4 * cfg.n_layers * n * h * seq_len)


def measure_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s of the first device: best of `repeats` large jnp.dot calls.
    On CPU this stands in for the datasheet peak; on accelerators it is a lower bound."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class MetricsWriter:
    """Appends to metrics.jsonl and TensorBoard events; only process 0 writes."""

    def __init__(self, run_dir: str | pathlib.Path, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled and jax.process_index() == 0
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                # purge_step: on resume, TensorBoard hides the events a killed run wrote
                # after its last checkpoint (metrics.jsonl is truncated likewise)
                self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tb"), purge_step=purge_step)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            row[k] = v.item() if v.size == 1 else v.tolist()
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
