"""Typed, frozen configuration of a run. Recipes in configs/ state only what differs.

    cfg = load_config("configs/pretrain/tiny.yaml", ["train.steps=50", "mesh.tensor=2"])
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Sequence

from jaxllm import configlib
from jaxllm.configlib import ConfigError
from jaxllm.data.config import DataConfig

Dtype = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama-family transformer (Llama 2/3, Mistral, Qwen2)."""
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2             # grouped-query attention; == n_heads is plain MHA
    head_dim: int = 0               # 0 -> d_model // n_heads
    d_ff: int = 128                 # SwiGLU hidden width
    rope_theta: float = 10000.0
    # Llama 3.1-style frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); empty = none.
    rope_scaling: tuple[float, ...] = ()
    norm_eps: float = 1e-5
    qkv_bias: bool = False          # Qwen2
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    param_dtype: Dtype = "float32"
    # bf16 compute is the accelerator default; on CPU XLA's bf16 matmuls are slower, so fp32.
    compute_dtype: Dtype = "float32"
    remat: RematPolicy = "none"
    attention: Literal["xla", "cudnn"] = "xla"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of "
                              f"model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) is not divisible by model.n_heads "
                              f"({self.n_heads}); set model.head_dim explicitly")
        if self.dim_per_head % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.dim_per_head}")
        if self.attention == "cudnn" and self.compute_dtype == "float32":
            raise ConfigError("model.attention=cudnn needs model.compute_dtype bfloat16 or float16 "
                              "(cuDNN fused attention has no fp32 kernel)")
        if self.rope_scaling and len(self.rope_scaling) != 4:
            raise ConfigError("model.rope_scaling takes 4 numbers: (factor, low_freq_factor, "
                              f"high_freq_factor, original_max_position_embeddings), got {self.rope_scaling}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 on one axis fills the remaining devices."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis -> mesh axes. `preset` picks a table (dp, fsdp, fsdp_tp); `rules` overrides
    # single entries, e.g. {"vocab": ["tensor"]} or {"embed": []}.
    preset: Literal["dp", "fsdp", "fsdp_tp"] = "fsdp"
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    devices: int = 0                # use the first N devices (0 = all of them)

    def __post_init__(self):
        from jaxllm.parallel.rules import check_rule_overrides
        check_rule_overrides(self.rules)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 10
    decay_steps: int = 0            # 0 -> train.steps
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0          # global-norm clipping; 0 disables
    max_nonfinite_skips: int = 5    # consecutive non-finite updates skipped before the run stops

    def __post_init__(self):
        if self.max_nonfinite_skips < 1:
            raise ConfigError(f"optim.max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: Literal["clm", "mlm"] = "clm"
    steps: int = 100
    batch_size: int = 8             # global, in sequences
    seq_len: int = 128
    microbatches: int = 1           # gradient accumulation (token-weighted)
    seed: int = 0
    z_loss: float = 0.0
    mlm_prob: float = 0.15
    mlm_mask_id: int = -1           # -1: the tokenizer's <mask> (text data) or vocab_size-1
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4           # 0: the data config decides (text data: the whole held-out set)
    run_dir: str = "runs/default"
    progress: bool = True
    # Single-device debug mode: one device, jax_debug_nans, optionally no jit (pdb steps in).
    debug: bool = False
    disable_jit: bool = False

    def __post_init__(self):
        for name in ("microbatches", "log_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                              f"train.microbatches ({self.microbatches})")
        if self.steps < 0 or self.seq_len < 2:
            raise ConfigError("train.steps must be >= 0 and train.seq_len >= 2")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0            # save every N steps (0: only at the end / on preemption)
    keep: int = 3             # keep the last K checkpoints ...
    keep_every: int = 0       # ... plus every M-th step forever (0: none)
    async_save: bool = True
    resume: bool = True       # resume from the latest complete checkpoint in run_dir
    init_from: str = ""       # start a NEW run from these params: a run dir, checkpoint dir or HF dir


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed. Leave empty on one host; on SLURM / TPU pods `auto` finds the peers."""
    coordinator: str = ""           # "host:port" of process 0, for explicit launches
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"
    auto: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()


def load_config(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a run config from YAML plus `a.b=c` overrides; every error names key and file."""
    return configlib.load(Config, path, overrides)
