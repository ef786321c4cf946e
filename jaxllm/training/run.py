"""Run setup shared by every recipe: what surrounds the step, never the step itself.

    with Run(cfg) as run:                                    # dirs, lock, mesh, rules, debug
        state, shardings, optimizer = run.start_state(...)   # resume / init_from / fresh
        summary = fit(run, state, step_fn, batches, ...)     # training/loop.py

Recipes (training/pretrain.py, and SFT/reward/RL next) choose the objective, the data and what
is trainable; everything else (config checks on resume, the run-dir lock, the sharding table,
checkpoints, metrics, preemption, debug mode) lives here once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import socket
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from jaxllm import configlib, host_alloc, xla_flags
from jaxllm.config import Config
from jaxllm.configlib import ConfigError
from jaxllm.errors import RunError
from jaxllm.model import cpu_gemm
from jaxllm.parallel import distributed
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules as rules_lib
from jaxllm.training import metrics as metrics_lib
from jaxllm.training.checkpoint import Checkpointer, load_params, source_model_config, source_tokenizer
from jaxllm.training.preemption import PreemptionGuard
from jaxllm.training.setup import make_state, plan_state

# Config keys that may change between a run and its resume: they do not change what is
# computed (logging, evaluation cadence, checkpointing, the mesh: a checkpoint restores onto
# any mesh). Everything else changes the trajectory and is refused unless
# checkpoint.allow_config_change=true. train.steps is handled apart (the lr schedule).
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.eval_batches", "train.run_dir",
                     "train.progress", "train.debug", "train.disable_jit", "checkpoint.every",
                     "checkpoint.keep", "checkpoint.async_save", "checkpoint.resume",
                     "checkpoint.allow_config_change", "checkpoint.fallback", "distributed.",
                     "mesh.", "optim.offload_state", "model.remat", "model.attention", "model.logits_chunk",
                     "model.matmul", "model.scan_layers", "data.eval_sources", "data.eval_batches",
                     "data.worker_buffer_size", "data.num_workers")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "rules":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.loads(json.dumps(v))   # tuples -> lists, as saved
    return out


def data_fingerprints(data_cfg) -> dict:
    """What the token ids a run trains on depend on beyond its config: the contents of its
    tokenizer and of the chat template it renders with (a file replaced at the same path is no
    config change). {} when there is no tokenizer, or it cannot be loaded (the recipe then says why)."""
    import hashlib

    from jaxllm.data.tokenizer import fingerprint, load_tokenizer
    if not data_cfg.tokenizer:
        return {}
    try:
        tok = load_tokenizer(data_cfg.tokenizer)
    except (OSError, ValueError):
        return {}
    out = {"tokenizer": fingerprint(tok)}
    if data_cfg.kind == "chat" or data_cfg.chat_template:
        from jaxllm.data.chat import load_template
        try:
            source = load_template(data_cfg.chat_template, tok).source   # None: the built-in ChatML
            out["chat_template"] = hashlib.sha1(("built-in ChatML" if source is None else source).encode()).hexdigest()
        except (OSError, ValueError):
            pass
    return out


def config_changes(saved: dict, now: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs. A key the saved config
    does not have (added to jaxllm since it was saved) is no change while it holds its default."""
    a, b, d = _flat(saved), _flat(now), _flat(defaults or {})
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (k not in a and k in d and b.get(k) == d[k])]


class RunLock:
    """`run_dir/.lock` with pid, host and a heartbeat: a second run on the same directory
    refuses at start-up. A lock whose process is gone (same host) or whose heartbeat is older
    than `stale_s` (another host) is stale and taken over, said in one line."""

    def __init__(self, run_dir: pathlib.Path, stale_s: float = 900.0):
        self.path = run_dir / ".lock"
        self.stale_s = stale_s
        self.held = False

    def _describe(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, info: dict | None) -> str | None:
        if info is None:
            return "unreadable lock file"
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return f"process {info['pid']} is gone"
            except (PermissionError, ValueError, KeyError):
                pass
            return None
        age = time.time() - self.path.stat().st_mtime
        return f"no heartbeat for {age:.0f} s" if age > self.stale_s else None

    def acquire(self, log: Callable[[str], None]) -> None:
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._describe()
                why = self._stale(info)
                if why is None:
                    raise RunError(f"{self.path.parent} is in use by another run (pid {info.get('pid')} "
                                   f"on {info.get('host')}); wait for it to finish, use another "
                                   f"train.run_dir, or delete {self.path} if that run is dead")
                log(f"taking over a stale lock on {self.path.parent} ({why})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(body)
            self.held = True
            return
        raise RunError(f"could not lock {self.path.parent}")

    def heartbeat(self) -> None:
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class Run:
    """Directory, lock, mesh, logical rules, debug mode, checkpointer, metrics writer."""

    def __init__(self, cfg: Config):
        distributed.initialize(cfg.distributed)   # before any backend use; no-op on one host
        self.cfg = cfg
        t = cfg.train
        self.dir = pathlib.Path(t.run_dir)
        self.is_main = jax.process_index() == 0
        ckpt_dir = self.dir / "checkpoints"
        if not cfg.checkpoint.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise ConfigError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=false: "
                              f"use a new train.run_dir (or resume=true to continue that run)")
        devices = self._devices()
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        if cfg.model.matmul == "blas":     # before the run dir exists
            cpu_gemm.check_mesh(self.mesh)
        self.dcn = mesh_lib.dcn_shape(cfg.mesh, devices)   # slices/hosts each mesh axis spans
        self.rules = rules_lib.logical_rules(cfg.mesh)
        self.lock = RunLock(self.dir)
        self.checkpointer: Checkpointer | None = None
        self.writer: metrics_lib.MetricsWriter | None = None
        self.guard = PreemptionGuard()
        self._stack = contextlib.ExitStack()

    def _devices(self) -> list:
        cfg = self.cfg
        if cfg.train.debug:
            if jax.process_count() > 1:
                raise ConfigError("train.debug=true is single-device: run it as one process")
            return jax.devices()[:1]
        n = cfg.mesh.devices
        if n:
            if jax.process_count() > 1:
                raise ConfigError(f"mesh.devices={n} would slice the global device list on a "
                                  f"multi-host run; leave it 0 and size the mesh axes instead")
            if n > len(jax.devices()):
                raise ConfigError(f"mesh.devices={n} but only {len(jax.devices())} devices exist")
        return jax.devices()[:n or None]

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Run":
        s = self._stack
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.is_main:
                self.lock.acquire(self.log)
                s.callback(self.lock.release)
            if self.cfg.train.debug:
                s.enter_context(jax.debug_nans(True))
                if self.cfg.train.disable_jit:
                    s.enter_context(jax.disable_jit())
            s.enter_context(jax.set_mesh(self.mesh))
            s.enter_context(nn.logical_axis_rules(self.rules))
            s.enter_context(self.guard)
            if math.prod(self.dcn) > 1:
                self.log("hybrid mesh: " + ", ".join(
                    f"{ax} {self.mesh.shape[ax]} = {d} slices/hosts x {self.mesh.shape[ax] // d}"
                    for ax, d in zip(self.mesh.axis_names, self.dcn)))
            if note := xla_flags.cpu_dtype_note(self.cfg.model, jax.default_backend()):
                self.log(note)
            if not self.guard.handles_sigterm:
                self.log("SIGTERM is left to JAX's preemption service: on a notice to any host, "
                         "every host saves the step they agree on and exits")
        except BaseException:
            s.close()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.checkpointer is not None:
                self.checkpointer.wait()
                self.checkpointer.close()
            if self.writer is not None:
                self.writer.close()
        finally:
            self._stack.close()

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def log_host_alloc(self) -> None:
        """As training starts: what `jaxllm train` did to glibc before the backend started."""
        if host_alloc.status():
            self.log(host_alloc.status())

    # ------------------------------------------------------------------ layout
    def check_layout(self) -> None:
        t = self.cfg.train
        per_micro = t.batch_size // t.microbatches
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if per_micro % shards:
            raise ConfigError(f"train.batch_size / train.microbatches = {per_micro} rows per microbatch "
                              f"must be divisible by mesh data*fsdp = {shards}")
        for ax in rules_lib.idle_mesh_axes(self.rules, self.mesh):
            self.log(f"warning: mesh.{ax}={self.mesh.shape[ax]} shards nothing under "
                     f"mesh.preset={self.cfg.mesh.preset}: those devices repeat the same work")

    def report_sharding(self, param_specs, abstract_params, opt_state=None, label: str = "params") -> None:
        """The parameter table (shape, sharding, bytes per device) and the refusal of silent
        replication beyond mesh.replication_tolerance."""
        rep = rules_lib.sharding_report(param_specs, abstract_params, self.rules, self.mesh)
        opt_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize // _per_device_divisor(a)
                        for a in jax.tree.leaves(opt_state))
        lines = [f"{label:<34} {'shape':<22} {'sharding':<34} {'MiB/device':>10}"]
        for name, shape, spec, b in rep["rows"]:
            lines.append(f"{name:<34} {str(shape):<22} {str(tuple(spec)):<34} {b / 2**20:>10.2f}")
        lines.append(f"{label} {rep['bytes_per_device'] / 2**20:.2f} MiB/device "
                     f"(of {rep['total_bytes'] / 2**20:.2f} MiB)"
                     + (f", optimizer state {opt_bytes / 2**20:.2f} MiB/device" if opt_state is not None else "")
                     + (" (in host memory: optim.offload_state)" if self.cfg.optim.offload_state
                        and opt_state is not None else "")
                     + f", mesh {dict(self.mesh.shape)}")
        self.log("\n".join(lines))
        for d in rep["dropped"]:
            self.log(f"replicated (mesh axis does not divide): {d}")
        frac, tol = rep["replicated_fraction"], self.cfg.mesh.replication_tolerance
        if frac > tol:
            raise ConfigError(
                f"{frac:.0%} of parameter bytes that mesh.preset={self.cfg.mesh.preset} means to shard "
                f"would be replicated (mesh axes that do not divide their dimension; listed above); "
                f"change the mesh or model sizes, override mesh.rules, or raise "
                f"mesh.replication_tolerance (now {tol})")

    # ------------------------------------------------------------------ state
    def start_state(self, *, init_fn: Callable, param_specs, make_optimizer: Callable[[int], Any],
                    data_iter=None, meta: dict | None = None, frozen_specs=None, frozen_shapes=None,
                    init_from_trainable: bool = True):
        """Resume from this run's newest checkpoint, else start from checkpoint.init_from's
        params, else initialise. Config changes are checked before anything is written.
        make_optimizer(schedule_steps) builds the optimizer for an lr horizon.
        init_from_trainable=False: checkpoint.init_from is the frozen base (LoRA, adapters),
        loaded by the recipe; the trainable delta starts fresh.
        -> (state, StepShardings, optimizer, meta, resumed_from step or None)."""
        cfg = self.cfg
        self.checkpointer = Checkpointer(self.dir / "checkpoints", cfg.checkpoint)
        latest = self.checkpointer.latest_step() if cfg.checkpoint.resume else None
        meta = dict(meta or {})
        meta["model"] = dataclasses.asdict(cfg.model)
        meta["config"] = configlib.to_dict(cfg)
        horizon = cfg.optim.decay_steps or cfg.train.steps
        files = data_fingerprints(cfg.data)
        if latest is not None:
            saved = self.checkpointer.read_meta(latest)
            horizon = self._check_resume(saved, horizon, files)
            meta.update({k: v for k, v in saved.items() if k not in ("model", "config", "data_files")})
        # the files this run trains with from now on (an accepted change is recorded)
        meta["schedule_steps"], meta["data_files"] = horizon, files
        if cfg.model.param_dtype != "float32":
            self.log(f"note: model.param_dtype={cfg.model.param_dtype}: parameters and Adam moments "
                     f"are kept in {cfg.model.param_dtype}, so updates below its resolution round "
                     f"away (float32 master weights are the default)")
        optimizer = make_optimizer(horizon)
        self._check_grad_compression()
        abstract, shardings = plan_state(init_fn, param_specs, optimizer, self.rules, self.mesh,
                                         frozen_specs=frozen_specs, frozen_shapes=frozen_shapes,
                                         offload_opt_state=cfg.optim.offload_state)
        fresh_shardings, error = shardings, None
        if cfg.optim.grad_compression == "int8":   # opt_state = (optimizer state, error feedback)
            from jaxllm.parallel import compress
            n, saved_n = self.mesh.shape["data"], meta.get("error_feedback_shards", self.mesh.shape["data"])
            if latest is not None and saved_n != n:
                raise ConfigError(f"optim.grad_compression=int8 keeps one error-feedback residual per data shard: "
                                  f"{self.dir}'s checkpoint has {saved_n}, this mesh data={n}; resume on "
                                  f"data={saved_n}")
            meta["error_feedback_shards"] = n
            error = compress.error_feedback_abstract(abstract.params, self.mesh)
            abstract = abstract.replace(opt_state=(abstract.opt_state, error))
            st = shardings.state
            shardings = dataclasses.replace(shardings, state=st.replace(
                opt_state=(st.opt_state, jax.tree.map(lambda e: e.sharding, error))))
        self.report_sharding(param_specs, abstract.params, abstract.opt_state,
                             label="trainable" if frozen_specs is not None else "params")
        if frozen_specs is not None:
            self.report_sharding(frozen_specs, frozen_shapes, label="frozen")
        resumed_from = None
        if latest is not None:
            state, saved_meta, resumed_from = self.checkpointer.restore_newest_intact(
                abstract, data_iter, fallback=cfg.checkpoint.fallback, log=self.log)
            meta.update({k: v for k, v in saved_meta.items() if k not in ("model", "config", "data_files")})
            if cfg.optim.offload_state:   # orbax restores into device memory
                state = jax.device_put(state, shardings.state)
            self.log(f"resumed {self.dir} at step {resumed_from}")
        else:
            params = (self.load_init_from(abstract.params) if cfg.checkpoint.init_from and init_from_trainable
                      else None)
            state = make_state(init_fn, optimizer, fresh_shardings, cfg.train.seed, params=params)
            if error is not None:
                from jaxllm.parallel import compress
                state = state.replace(opt_state=(state.opt_state, compress.zero_error(error)))
        if self.is_main:   # only now, after every check passed
            configlib.dump_yaml(cfg, self.dir / "config.yaml")
        self.writer = metrics_lib.MetricsWriter(
            self.dir, purge_step=None if resumed_from is None else resumed_from + 1)
        if resumed_from is not None:
            metrics_lib.truncate_metrics(self.dir / "metrics.jsonl", resumed_from)
        return state, shardings, optimizer, meta, resumed_from

    def _check_grad_compression(self) -> None:
        gc = self.cfg.optim.grad_compression
        if gc != "none":
            from jaxllm.parallel import compress
            problem = compress.mesh_problem(self.mesh)
            if problem:
                raise ConfigError(f"optim.grad_compression={gc}: {problem} (mesh.preset=dp shards only over data)")

    def step_options(self) -> dict:
        """make_train_step's keywords for this run's gradient reduction."""
        gc = self.cfg.optim.grad_compression
        return {} if gc == "none" else {"grad_compression": gc, "mesh": self.mesh}

    def _check_resume(self, saved: dict, horizon: int, files: dict) -> int:
        """Refuse trajectory-changing config changes, and a tokenizer or chat template whose
        contents changed at the same path; keep the lr schedule's horizon."""
        now = configlib.to_dict(self.cfg)
        if "config" in saved:
            changes = [c for c in config_changes(saved["config"], now, configlib.to_dict(Config()))
                       if c[0] != "train.steps" and not c[0].startswith(RESUMABLE_CHANGES)]
            was = saved.get("data_files") or {}   # absent: a checkpoint from before this record
            key = {"tokenizer": "data.tokenizer", "chat_template": "data.chat_template"}
            changes += [(f"{key[k]} contents", f"sha1 {was[k][:10]}", f"sha1 {files[k][:10]}" if k in files else "none")
                        for k in was if was[k] != files.get(k)
                        and not any(c[0] == key[k] for c in changes)]   # a new path is named already
            if changes:
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
                if not self.cfg.checkpoint.allow_config_change:
                    raise ConfigError(f"{self.dir} was trained with another config: {listed}. "
                                      f"Resume with the saved config ({self.dir}/config.yaml), use a "
                                      f"new train.run_dir, or set checkpoint.allow_config_change=true")
                self.log(f"resuming with config changes (checkpoint.allow_config_change=true): {listed}")
        else:
            self.log(f"note: {self.dir}'s checkpoint predates config checks on resume; not compared")
        saved_horizon = saved.get("schedule_steps")
        if saved_horizon and not self.cfg.optim.decay_steps and saved_horizon != horizon:
            self.log(f"train.steps is now {self.cfg.train.steps}: the lr schedule keeps the decay "
                     f"horizon of {saved_horizon} steps it was started with (after it the lr stays at "
                     f"its minimum); set optim.decay_steps to re-plan it")
            return int(saved_horizon)
        return horizon

    def _compare_tokenizer(self, src: str, step: int | None) -> None:
        """A base trained with another tokenizer reads every token id as another piece: said in
        one line (not refused: a deliberately extended vocabulary is a real use)."""
        ours = data_fingerprints(self.cfg.data).get("tokenizer")
        if ours is None:
            return
        theirs = source_tokenizer(src, step)
        if theirs is None:
            self.log(f"note: {src} records no tokenizer, so this run's data.tokenizer is not compared with "
                     f"the one it was trained with")
        elif theirs != ours:
            self.log(f"warning: {src} was trained with another tokenizer than data.tokenizer="
                     f"{self.cfg.data.tokenizer} (sha1 {theirs[:10]} vs {ours[:10]}): every token id "
                     f"means another piece to it; use the base's tokenizer unless the change is deliberate")

    def load_init_from(self, abstract_params, path: str | None = None, step: int | None = None):
        """Params of another run / checkpoint / HF model (checkpoint.init_from, or `path` at
        `step`), checked against this run's model, restored straight into the target shardings
        (optimizer state is never read)."""
        cfg = self.cfg
        src = cfg.checkpoint.init_from if path is None else path
        src_model = source_model_config(src)
        if src_model:
            ignore = {"param_dtype", "compute_dtype", "remat", "attention", "attention_block", "max_seq_len",
                      "init_std", "scale_residual_init", "logits_chunk", "scan_layers", "dot_output", "matmul"}
            ours = dataclasses.asdict(cfg.model)
            diffs = [f"{k}: {src_model[k]!r} there vs {ours[k]!r} here" for k in ours
                     if k not in ignore and k in src_model
                     and (tuple(src_model[k]) if isinstance(src_model[k], list) else src_model[k]) != ours[k]]
            if diffs:
                raise ConfigError(f"checkpoint.init_from={src} has another model: "
                                  + "; ".join(diffs) + " (set model.* to match)")
        self._compare_tokenizer(src, step)
        # master weights keep this run's param dtype (an HF bf16 file must not make bf16 masters)
        params, _ = load_params(src, abstract_params, step=step)
        params = jax.tree.map(lambda p, ref: p.astype(ref.dtype), params, abstract_params)
        self.log(f"initialised params from {src}" + (f" (step {step})" if step is not None else ""))
        return params


def _per_device_divisor(a) -> int:
    """How many ways a ShapeDtypeStruct's sharding splits it."""
    sh = getattr(a, "sharding", None)
    if sh is None or not hasattr(sh, "shard_shape"):
        return 1
    shard = sh.shard_shape(a.shape)
    return max(1, int(np.prod(a.shape)) // max(1, int(np.prod(shard)))) if a.shape else 1
