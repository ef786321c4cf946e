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
from jaxllm.parallel.axes import check_rule_overrides

Dtype = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "offload"]


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
    # What every matmul writes (all accumulate in fp32): float32, or the compute dtype (torch
    # autocast's numerics: bf16 logits and attention scores, upcast for the softmax). On CPU
    # only the latter reaches oneDNN's AMX kernels; the launcher then sets the XLA flags for
    # them (jaxllm/xla_flags.py). Measured in benchmarks/bench_vs_torch.py.
    dot_output: Literal["float32", "compute"] = "float32"
    # Which GEMM runs the projections and the LM head: xla (XLA's own), or blas: OpenBLAS's
    # sgemm through a custom call (model/cpu_gemm.py), with attention (xla or blockwise) one
    # fused CPU kernel around sgemms; faster than XLA's fp32 GEMM on CPUs without bf16
    # hardware; CPU, fp32, one device only.
    matmul: Literal["xla", "blas"] = "xla"
    remat: RematPolicy = "none"
    # Layers run under lax.scan (compile time flat in depth) or unrolled (each layer its own
    # HLO: no per-layer residual stacks, so faster steps on CPU; see benchmarks/bench_layers.py).
    # Same params (stacked on layers) and the same math either way.
    scan_layers: bool = True
    # xla: the reference (scores at (B, heads, T, S) in fp32); blockwise: flash attention in
    # plain JAX, memory linear in T (model/blockwise.py); cudnn: fused kernel on NVIDIA GPUs.
    attention: Literal["xla", "cudnn", "blockwise"] = "xla"
    attention_block: int = 512      # blockwise: queries and keys per block
    # Attention-output and MLP-down kernels start at init_std / sqrt(2 * n_layers) (GPT-2).
    scale_residual_init: bool = True
    # The LM head's loss is computed this many sequence positions at a time, so the full
    # (B, T, vocab) fp32 logits never exist in a training step (0: all at once).
    logits_chunk: int = 512

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
        if self.dot_output == "compute" and self.compute_dtype == "float32":
            raise ConfigError("model.dot_output=compute makes matmuls write the compute dtype, which "
                              "is float32 here; set model.compute_dtype=bfloat16 or leave dot_output=float32")
        if self.matmul == "blas" and self.compute_dtype != "float32":
            raise ConfigError(f"model.matmul=blas runs fp32 GEMMs (OpenBLAS sgemm); model.compute_dtype is "
                              f"{self.compute_dtype}: set it to float32 or leave model.matmul=xla")
        if self.attention_block <= 0:
            raise ConfigError(f"model.attention_block must be positive, got {self.attention_block}")
        if self.logits_chunk < 0:
            raise ConfigError(f"model.logits_chunk must be >= 0, got {self.logits_chunk}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")
        if self.rope_scaling and len(self.rope_scaling) != 4:
            raise ConfigError("model.rope_scaling takes 4 numbers: (factor, low_freq_factor, "
                              f"high_freq_factor, original_max_position_embeddings), got {self.rope_scaling}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def dot_dtype(self) -> str:
        """The dtype matmuls write (model.dot_output)."""
        return self.compute_dtype if self.dot_output == "compute" else "float32"


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
    # Hybrid ICI x DCN meshes (multi-slice TPU, multi-node GPU): how many slices (or hosts)
    # each axis spans; the axis's size is split as dcn x per-slice. dcn_data 0 = auto: the
    # number of TPU slices the devices span (data parallel across slices), else 1.
    dcn_data: int = 0
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # Start-up refuses a layout where more than this fraction of parameter bytes that the
    # preset means to shard ends up replicated (a mesh axis that does not divide a dim).
    replication_tolerance: float = 0.05

    def __post_init__(self):
        check_rule_overrides(self.rules)
        if self.devices < 0:
            raise ConfigError(f"mesh.devices must be >= 0 (0 = all devices), got {self.devices}")
        if self.dcn_data < 0 or self.dcn_fsdp < 1 or self.dcn_tensor < 1:
            raise ConfigError(f"mesh.dcn_data must be >= 0 (0 = auto) and mesh.dcn_fsdp/dcn_tensor >= 1, "
                              f"got {self.dcn_data}, {self.dcn_fsdp}, {self.dcn_tensor}")
        if not 0 <= self.replication_tolerance <= 1:
            raise ConfigError(f"mesh.replication_tolerance must be in [0, 1], got {self.replication_tolerance}")


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
    # AdamW's two moments: "" keeps them in the param dtype; "bfloat16" halves the optimizer
    # state under fp32 master weights (updates are computed in fp32, then rounded to bf16; with
    # b2 >= ~0.99 a step moves nu by less than bf16's resolution, so it tracks poorly)
    moment_dtype: Literal["", "float32", "bfloat16"] = ""
    # ZeRO-Offload: the optimizer state lives in host memory (memory kind pinned_host) between
    # steps; each step moves it to the device, updates it there and moves it back. Frees the
    # moments' device memory for a host<->device copy per step (same numbers either way).
    offload_state: bool = False
    # the gradients' reduction over the `data` axis of a data-parallel mesh (parallel/compress.py):
    # "bf16" all-reduces in bf16; "int8" reduce-scatters + all-gathers int8 blocks with one fp32
    # scale per 256 values, each data shard keeping its quantization error (error feedback, in
    # the checkpoint beside the optimizer state)
    grad_compression: Literal["none", "bf16", "int8"] = "none"

    def __post_init__(self):
        import math
        if self.grad_compression == "int8" and self.offload_state:
            raise ConfigError("optim.grad_compression=int8 keeps its error feedback beside the optimizer "
                              "state on the devices; it does not combine with optim.offload_state")
        for name in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "min_lr_ratio"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"optim.{name} must be a finite number >= 0, got {v}")
        if not (self.b1 < 1 and self.b2 < 1):
            raise ConfigError(f"optim.b1 and optim.b2 must be < 1, got {self.b1}, {self.b2}")
        if self.max_nonfinite_skips < 1:
            raise ConfigError(f"optim.max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: Literal["clm", "mlm", "sft", "reward", "ppo", "grpo", "dpo"] = "clm"
    # sft: "token" weighs every answer token the same; "sequence" every example the same
    sft_normalize: Literal["token", "sequence"] = "token"
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
    # At each evaluation, completions of these prompts (sampled, a fixed key) go to the run
    # dir's samples.jsonl and TensorBoard: what the model writes next to its loss curve.
    sample_prompts: tuple[str, ...] = ()
    sample_tokens: int = 32
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
        if not 0 < self.mlm_prob < 1:
            raise ConfigError(f"train.mlm_prob must be in (0, 1), got {self.mlm_prob}")
        if self.eval_every < 0 or self.eval_batches < 0:
            raise ConfigError(f"train.eval_every and train.eval_batches must be >= 0, got "
                              f"{self.eval_every}, {self.eval_batches}")
        if not self.run_dir.strip():
            raise ConfigError("train.run_dir is empty: give a directory for checkpoints and metrics")
        if self.z_loss < 0:
            raise ConfigError(f"train.z_loss must be >= 0, got {self.z_loss}")
        if self.sample_tokens < 1:
            raise ConfigError(f"train.sample_tokens must be >= 1 (new tokens per sample prompt), "
                              f"got {self.sample_tokens}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500          # save every N steps (0: only at the end / on preemption)
    keep: int = 3             # keep the last K checkpoints ...
    keep_every: int = 0       # ... plus every M-th step forever (0: none)
    async_save: bool = True
    resume: bool = True       # resume from the latest complete checkpoint in run_dir
    init_from: str = ""       # start a NEW run from these params: a run dir, checkpoint dir or HF dir
    # Resume refuses a changed config that changes the trajectory (model, optimizer, data,
    # seed, batch) naming each key; true accepts the change (said in one line per key).
    allow_config_change: bool = False
    # The newest checkpoint cannot be read: false stops naming it and the newest intact one;
    # true restores that one instead (with a warning).
    fallback: bool = False

    def __post_init__(self):
        if self.every < 0 or self.keep_every < 0:
            raise ConfigError(f"checkpoint.every and checkpoint.keep_every must be >= 0, got "
                              f"{self.every}, {self.keep_every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1 (the checkpoints to keep), got {self.keep}; "
                              "to save nothing periodically set checkpoint.every=0")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA: y = x W + s (x A) B on the target matrices, W frozen, only {A, B} trained."""
    r: int = 0                      # rank; 0 = LoRA off
    alpha: float = 16.0             # scale s = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False
    # regex over parameter paths like "layers/attn/q/kernel"; default: attention q, k, v, o
    # and MLP gate, up, down
    targets: str = r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
    init: Literal["gaussian", "peft"] = "gaussian"   # A ~ N(0, 1/r) or PEFT's kaiming-uniform; B = 0
    dropout: float = 0.0            # on the LoRA input, training only
    # token ids or pieces whose embedding and LM-head rows are trained too (PEFT's
    # trainable_token_indices): e.g. a chat template's specials that pretraining never saw;
    # [all]: every row of both tables (its patches are (B, T, vocab): small vocabularies)
    trainable_tokens: tuple[int | str, ...] = ()
    # QLoRA: keep the frozen base's layer matrices as int8 or 4-bit NormalFloat codes with an
    # fp32 absmax scale per block of `quantize_block` values, dequantized per matmul
    # (model/quant.py); the delta, embedding, norms and LM head keep their dtypes
    quantize_base: Literal["none", "int8", "nf4"] = "none"
    quantize_block: int = 64

    def __post_init__(self):
        if self.quantize_block < 1:
            raise ConfigError(f"lora.quantize_block must be >= 1, got {self.quantize_block}")
        if self.r < 0:
            raise ConfigError(f"lora.r must be >= 0 (0 = off), got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapters at the attention and MLP sublayers of every layer, up initialised to
    zero; the base is frozen. placement "serial" (Houlsby): y = f(h) + s*up(act(down(f(h))));
    "parallel" (He et al. 2022): y = f(h) + s*up(act(down(h))), h the sublayer's normed input."""
    size: int = 0                   # bottleneck width; 0 = adapters off
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    placement: Literal["serial", "parallel"] = "serial"
    scale: float = 1.0              # s above (He et al. use 4 for parallel adapters)
    init_std: float = 1e-2          # std of the down projection's init (Houlsby's near-identity)
    trainable_tokens: tuple[int | str, ...] = ()   # as lora.trainable_tokens
    # Houlsby et al. also train the layer norms: a zero-initialised additive delta on every
    # RMSNorm scale (attention, MLP and final norm). Scaling the normed input of q and k lets
    # a delta after the sublayers change what the first layer attends to.
    train_norms: bool = False
    # Houlsby et al. also train their top layer. For an LM that is the embedding tables: a
    # zero-initialised additive delta on the whole input embedding and LM head (vocab x d each;
    # on the `small` base this halved the adapters' gap to full SFT, README). Every row, so
    # trainable_tokens is then redundant and refused.
    train_embeddings: bool = False

    def __post_init__(self):
        if self.size < 0:
            raise ConfigError(f"adapter.size must be >= 0 (0 = off), got {self.size}")
        if self.train_embeddings and self.trainable_tokens:
            raise ConfigError("adapter.trainable_tokens with adapter.train_embeddings: the tables' "
                              "every row is trained already; drop adapter.trainable_tokens")
        if not self.init_std > 0:
            raise ConfigError(f"adapter.init_std must be > 0, got {self.init_std}")
        if not self.scale > 0:
            raise ConfigError(f"adapter.scale must be > 0, got {self.scale}")
        if self.placement not in ("serial", "parallel"):
            raise ConfigError(f"adapter.placement={self.placement!r}; valid: ['parallel', 'serial']")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward model from K-way rankings (InstructGPT): mean over the K-choose-2 pairs of
    -log sigmoid(r_better - r_worse - margin) + center_coef * mean(r^2)."""
    k_max: int = 4                  # responses per prompt, padded up to this with a mask
    margin: float = 0.0
    center_coef: float = 0.0        # pulls rewards towards 0 (the reward's offset is free)

    def __post_init__(self):
        if self.k_max < 2:
            raise ConfigError(f"reward.k_max must be >= 2 (a ranking compares responses), got {self.k_max}")
        for name in ("margin", "center_coef"):   # (written so that NaN fails too)
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"reward.{name} must be a finite number >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """PPO / GRPO iterations (train.steps counts iterations; train.batch_size is the number of
    prompts per iteration) and DPO's beta. Rollouts, scores, KL and advantages are computed
    outside the step; each minibatch update is the one train step."""
    # a reward-model run dir (training/reward.py); "": the programmatic task reward of the
    # embedded synthetic prompts (their "task" field), which also gives the true reward
    reward_model: str = ""
    group_size: int = 1              # samples per prompt (GRPO: >= 2)
    max_prompt_tokens: int = 64      # longer prompts keep their last tokens (counted)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0                   # 0: every token; else the k likeliest
    top_p: float = 1.0               # nucleus sampling, in (0, 1]
    epochs: int = 2                  # passes over each rollout batch
    minibatches: int = 2             # updates per pass
    clip: float = 0.2
    # PPO only (GRPO has no critic and refuses non-default values): value_clip, vf_coef,
    # entropy_coef, gamma, lam, whiten_advantages, kl_estimator, value_init, value_lr
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0        # >= 0: a bonus for the policy's entropy (< 0 would reward collapse)
    gamma: float = 1.0               # in [0, 1]
    lam: float = 0.95                # GAE's lambda, in [0, 1]
    kl_coef: float = 0.05            # beta of the KL penalty to the reference policy (PPO and GRPO)
    # PPO's per-token reward penalty; GRPO's loss term is always k3 (DeepSeekMath)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float = 0.0           # > 0: adaptive beta (Ziegler et al. 2019) towards this KL
    kl_horizon: float = 10000.0      # (only with kl_target > 0)
    whiten_advantages: bool = True
    # >= 0, SUBTRACTED from the score of a response that hit max_new_tokens without a stop
    # token (TRL's missing_eos_penalty)
    missing_eos_penalty: float = 0.0
    # the critic's head: zeros, or the reward model's scalar head (InstructGPT initialises the
    # value function from the reward model; here the head sits on the policy's trunk)
    value_init: Literal["zero", "reward_model"] = "zero"
    # the value head's peak learning rate (it follows optim's schedule): a linear head from
    # zeros at the policy's small lr cannot reach the returns' scale in a run (measured:
    # explained variance ~0 at 1e-4)
    value_lr: float = 1.0e-2
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 0.0       # > 0: + alpha * the best response's per-token NLL (RPO)

    def __post_init__(self):
        for name in ("group_size", "max_prompt_tokens", "max_new_tokens", "epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.temperature < float("inf"):
            raise ConfigError(f"rl.temperature must be > 0 (rollouts sample), got {self.temperature}")
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"rl.missing_eos_penalty={self.missing_eos_penalty}: it is a penalty >= 0 that is "
                              f"subtracted from a truncated response's score (TRL's sign); write "
                              f"{-self.missing_eos_penalty} to penalise truncation")
        inf = float("inf")   # each test below also fails for NaN
        for name, lo, lo_ok, hi, hi_ok, why in (
                ("clip", 0, False, inf, False, "the PPO/GRPO ratio clip"),
                ("value_clip", 0, False, inf, False, "the critic's clip"),
                ("kl_coef", 0, True, inf, False, "the KL penalty's beta"),
                ("kl_target", 0, True, inf, False, "0 = fixed beta"),
                ("kl_horizon", 0, False, inf, False, "adaptive beta's horizon"),
                ("vf_coef", 0, True, inf, False, "the value loss's weight"),
                ("entropy_coef", 0, True, inf, False, "an entropy bonus; < 0 would reward collapse"),
                ("gamma", 0, True, 1, True, "the discount"),
                ("lam", 0, True, 1, True, "GAE's lambda"),
                ("top_p", 0, False, 1, True, "nucleus sampling"),
                ("missing_eos_penalty", 0, True, inf, False, "subtracted from a truncated response's score"),
                ("dpo_beta", 0, False, inf, False, "DPO's beta")):
            v = getattr(self, name)
            if not ((v >= lo if lo_ok else v > lo) and (v <= hi if hi_ok else v < hi)):
                span = f"{'[' if lo_ok else '('}{lo}, {'inf' if hi == inf else hi}{']' if hi_ok else ')'}"
                raise ConfigError(f"rl.{name} must be in {span} ({why}), got {v}")
        if self.top_k < 0:
            raise ConfigError(f"rl.top_k must be >= 0 (0: no top-k cut), got {self.top_k}")
        if self.kl_horizon != RLConfig.kl_horizon and not self.kl_target:
            raise ConfigError("rl.kl_horizon is set but adaptive KL is off (rl.kl_target=0): set "
                              "rl.kl_target > 0 or drop rl.kl_horizon")
        if not 0 < self.value_lr < float("inf"):
            raise ConfigError(f"rl.value_lr must be > 0, got {self.value_lr}")
        if self.value_init == "reward_model" and not self.reward_model:
            raise ConfigError("rl.value_init=reward_model needs rl.reward_model (a reward-model run dir)")
        if not 0 <= self.dpo_rpo_alpha < float("inf"):
            raise ConfigError(f"rl.dpo_rpo_alpha must be a finite number >= 0, got {self.dpo_rpo_alpha}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed. Leave empty on one host; on SLURM / TPU pods `auto` finds the peers."""
    coordinator: str = ""           # "host:port" of process 0, for explicit launches
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"
    auto: bool = True
    # Dead peers: a process that sends no heartbeat for this long is declared dead and every
    # other process stops with an error (JAX's coordination service); JAX's defaults.
    heartbeat_timeout_s: int = 100
    initialization_timeout_s: int = 300   # waiting for all processes to join at start-up
    shutdown_timeout_s: int = 300         # waiting for all processes at the shutdown barrier

    def __post_init__(self):
        for name in ("heartbeat_timeout_s", "initialization_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distributed.{name} must be >= 1 second, got {getattr(self, name)}")


_RL = ("ppo", "grpo")
# Options read by some objectives only (a non-default value under another is refused). The rl.*
# keys PPO alone reads are listed as PPO/GRPO here: training/rl.py refuses them under GRPO
# with the reason.
OBJECTIVE_OPTIONS = {
    "train.sft_normalize": ("sft",), "train.mlm_prob": ("mlm",), "train.mlm_mask_id": ("mlm",),
    "train.seq_len": ("clm", "mlm", "sft", "reward", "dpo"),   # RL: rl.max_prompt_tokens + rl.max_new_tokens
    "reward.margin": ("reward",), "reward.center_coef": ("reward",), "reward.k_max": ("reward", "dpo"),
    "rl.dpo_beta": ("dpo",), "rl.dpo_rpo_alpha": ("dpo",),
    **{f"rl.{f.name}": _RL for f in dataclasses.fields(RLConfig) if not f.name.startswith("dpo_")},
}


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    lora: LoraConfig = LoraConfig()
    adapter: AdapterConfig = AdapterConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig = RLConfig()

    def __post_init__(self):
        if self.lora.r and self.adapter.size:
            raise ConfigError("lora.r and adapter.size are both set: train one kind of delta at a time")
        # options of a delta that is off would be ignored without a word
        if self.lora.trainable_tokens and not self.lora.r:
            raise ConfigError("lora.trainable_tokens needs lora.r > 0 (full fine-tuning trains every "
                              "token row already)")
        if self.lora.quantize_base != "none" and not self.lora.r:
            raise ConfigError(f"lora.quantize_base={self.lora.quantize_base} quantizes the frozen base of a "
                              f"LoRA run: set lora.r > 0 (full fine-tuning trains the base itself)")
        if self.lora.quantize_block != LoraConfig.quantize_block and self.lora.quantize_base == "none":
            raise ConfigError("lora.quantize_block is set but the base is not quantized (lora.quantize_base=none)")
        if self.lora.quantize_base != "none" and self.train.objective == "reward":
            raise ConfigError(f"lora.quantize_base={self.lora.quantize_base}: the reward recipe does not "
                              f"quantize its base (SFT, PPO/GRPO and DPO do)")
        if self.adapter.trainable_tokens and not self.adapter.size:
            raise ConfigError("adapter.trainable_tokens needs adapter.size > 0 (full fine-tuning trains "
                              "every token row already)")
        if self.adapter.init_std != AdapterConfig.init_std and not self.adapter.size:
            raise ConfigError("adapter.init_std is set but adapters are off (adapter.size=0)")
        for name, cfg, switch in (("lora", self.lora, "r"), ("adapter", self.adapter, "size")):
            if not getattr(cfg, switch):
                changed = [f"{name}.{f.name}" for f in dataclasses.fields(cfg)
                           if getattr(cfg, f.name) != f.default]
                if changed:
                    it = "it" if len(changed) == 1 else "them"
                    raise ConfigError(f"{', '.join(changed)} set but {name} is off ({name}.{switch}=0), so "
                                      f"{it} would be ignored: set {name}.{switch} > 0 or drop {it}")
        if self.train.sample_prompts and self.train.objective in ("reward", "dpo", "ppo", "grpo"):
            raise ConfigError(f"train.sample_prompts: the {self.train.objective} recipe does not write samples "
                              f"(clm, mlm and sft do; PPO/GRPO log their held-out answers); drop it")
        if self.train.sample_prompts and self.data.kind == "synthetic_tokens":
            raise ConfigError("train.sample_prompts needs a tokenizer to encode them: data.kind=synthetic_tokens "
                              "has none (use text or chat data, or drop them)")
        if self.train.sample_prompts and not self.train.eval_every:
            raise ConfigError("train.sample_prompts are written at each evaluation, and train.eval_every=0 "
                              "turns evaluation off: set train.eval_every > 0 or drop them")
        t = self.train
        if t.objective not in ("ppo", "grpo") and t.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} (the "
                              f"window generation, evaluation and the HF export take from the model): "
                              f"raise model.max_seq_len or lower train.seq_len")
        rl = self.rl
        if t.objective in ("ppo", "grpo") and rl.max_prompt_tokens + rl.max_new_tokens > self.model.max_seq_len:
            raise ConfigError(f"rl.max_prompt_tokens={rl.max_prompt_tokens} + rl.max_new_tokens={rl.max_new_tokens} "
                              f"exceeds model.max_seq_len={self.model.max_seq_len}: a rollout would not fit the "
                              f"model's window; lower one of them")
        # options of another objective would be ignored without a word
        for key, objectives in OBJECTIVE_OPTIONS.items():
            section, name = key.split(".")
            cfg = getattr(self, section)
            if getattr(cfg, name) != getattr(type(cfg), name) and t.objective not in objectives:
                raise ConfigError(f"{key} applies to train.objective={'/'.join(objectives)}, and this run "
                                  f"trains {t.objective}, which does not read it: drop it")
        if self.lora.dropout and self.train.objective in ("reward", "dpo", "ppo", "grpo"):
            raise ConfigError(f"lora.dropout={self.lora.dropout}: the {self.train.objective} objective "
                              f"runs the policy without dropout (clm, mlm and sft apply it); drop it")


def load_config(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a run config from YAML plus `a.b=c` overrides; every error names key and file."""
    return configlib.load(Config, path, overrides)
