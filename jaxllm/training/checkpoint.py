"""Checkpoints through orbax's CheckpointManager: async saves, retention, exact resume.

One checkpoint holds three items:
  state   the TrainState (trainable params, optimizer state, step, PRNG key data),
  data    the grain iterator state of each process (so the resumed run reads the next batch
          it would have; on another process count the states are remapped, data/layout.py),
  meta    JSON: the model config, the resolved run config, and controller state (e.g. an
          adaptive KL coefficient, the lr schedule's horizon).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
save killed midway is never listed: resume falls back to the previous complete one.
Every restore goes straight into target shardings on the current devices, so a checkpoint
saved on one mesh or device count loads onto another without gathering the model on a host.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.config import CheckpointConfig
from jaxllm.errors import RunError, UserError


class CheckpointError(RunError):
    pass


class CheckpointMismatch(CheckpointError):
    """The checkpoint is intact but cannot continue in this run (an older one would not either)."""


class _QuietReadOnly(logging.Filter):
    """orbax warns on every read-only manager it opens (init_from, convert), and when it reads
    an item's metadata without the step-level file it did not need: both are noise here."""
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Given directory is read only") or "read_only=True, setting" in msg
                    or (msg.startswith("Metadata file does not exist") and "_CHECKPOINT_METADATA" in msg))


logging.getLogger("absl").addFilter(_QuietReadOnly())


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: an orbax restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _diff_shapes(saved, target, prefix="") -> list[str]:
    """Human-readable differences between saved metadata and the target pytree."""
    out = []
    flat_saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_target = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    for k in sorted(set(flat_saved) | set(flat_target)):
        s, t = flat_saved.get(k), flat_target.get(k)
        if s is None:
            out.append(f"{prefix}{k}: missing from the checkpoint")
        elif t is None:
            out.append(f"{prefix}{k}: in the checkpoint but not in this run")
        elif tuple(getattr(s, "shape", ())) != tuple(t.shape):
            out.append(f"{prefix}{k}: checkpoint shape {tuple(s.shape)} vs run shape {tuple(t.shape)}")
    return out


def _one_line(e: BaseException) -> str:
    """Orbax/tensorstore errors run to dozens of lines; the first informative one names the
    file that is missing or corrupt."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
                enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        """Start a save of `step` (async unless configured otherwise). Returns whether it saved."""
        if not force and not (self.cfg.every and step % self.cfg.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        _check_finite(state)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            import grain
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self):
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """jax's multi-host preemption sync point (all hosts agree on the step)."""
        return self.manager.reached_preemption(step)

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The JSON item alone (cheap): read before anything is built, to check the config."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint
            raise CheckpointError(f"cannot read {self.directory}/{step}/meta: {_one_line(e)}") from e
        return dict(out["meta"] or {})

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restore into `abstract_state`'s shapes, dtypes and shardings. -> (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        self._check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        remapped = None
        if data_iter is not None:
            remapped = self._data_state_for_this_layout(step, data_iter)
            if remapped is None:   # saved by this process count: grain reads this process's file
                import grain
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint
            raise CheckpointError(f"cannot restore {self.directory}/{step}: {_one_line(e)}") from e
        if remapped is not None:
            data_iter.set_state(remapped)
            if hasattr(data_iter, "start_prefetch"):
                data_iter.start_prefetch()   # as grain's own restore does
        return out["state"], dict(out["meta"] or {})

    def _data_state_for_this_layout(self, step: int, data_iter) -> dict | None:
        """None when the checkpoint's data state was written by this process count; else this
        process's state built from every saved process's state (data/layout.py)."""
        n, p = jax.process_count(), jax.process_index()
        d = self.directory / str(step) / "data"
        if (d / f"process_{p}-of-{n}.json").exists() or not d.is_dir():
            return None    # (no data item at all: orbax's restore names what is missing)
        counts = {int(f.stem.rsplit("-of-", 1)[1]) for f in d.glob("process_*-of-*.json")}
        if len(counts) != 1:
            raise CheckpointError(f"{d} holds data states of {sorted(counts) or 'no'} process counts; "
                                  f"cannot tell which run wrote it")
        n_old = counts.pop()
        files = [d / f"process_{i}-of-{n_old}.json" for i in range(n_old)]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{d} lacks {', '.join(missing)}: the data state of the {n_old}-process "
                                  f"run that wrote step {step} is incomplete")
        remap = getattr(data_iter, "remap_state", None)
        if remap is None:
            raise CheckpointMismatch(f"step {step} was written by {n_old} processes and this run has {n}; "
                                  f"its data iterator cannot be mapped onto another process count: "
                                  f"resume on {n_old} processes")
        try:
            state = remap([json.loads(f.read_text()) for f in files])
        except UserError as e:
            raise CheckpointMismatch(f"cannot continue {d} ({n_old} processes) on {n}: {e}") from e
        if p == 0:
            print(f"data: the iterator states of the {n_old} processes that wrote step {step} are "
                  f"mapped onto {n} processes (the global batch sequence continues)", file=sys.stderr, flush=True)
        return state

    def restore_newest_intact(self, abstract_state, data_iter=None, *, fallback: bool,
                              log: Callable[[str], None] = print):
        """Restore the newest checkpoint; if it cannot be read, name it and the newest one
        that can, and restore that one only when `fallback` (checkpoint.fallback=true).
        -> (state, meta, step)."""
        steps = self.all_steps()[::-1]
        try:
            state, meta = self.restore(abstract_state, data_iter, steps[0])
            return state, meta, steps[0]
        except CheckpointError as newest_error:
            if isinstance(newest_error, CheckpointMismatch) or "does not match this run" in str(newest_error):
                raise
            for older in steps[1:]:
                try:
                    state, meta = self.restore(abstract_state, data_iter, older)
                except CheckpointError:
                    continue
                if not fallback:
                    raise CheckpointError(
                        f"{newest_error}; the newest intact checkpoint is step {older}: set "
                        f"checkpoint.fallback=true to resume from it (or delete "
                        f"{self.directory}/{steps[0]})") from None
                log(f"warning: checkpoint step {steps[0]} is unreadable ({_one_line(newest_error)}); "
                    f"resuming from step {older} (checkpoint.fallback=true)")
                return state, meta, older
            raise CheckpointError(f"{newest_error}; no older intact checkpoint in {self.directory}") from None

    def _check_compatible(self, step: int, abstract_state):
        """Compare saved parameter shapes with this run's before restoring, so the error
        names every tensor that differs (orbax would stop at the first)."""
        try:
            saved = self.saved_params_metadata(step)
        except Exception:  # noqa: BLE001 - metadata is best-effort; the restore still validates
            return
        diffs = _diff_shapes(saved, abstract_state.params, prefix="params")
        if diffs:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this run "
                                  f"(another model shape?): " + "; ".join(diffs[:6])
                                  + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""))

    def saved_params_metadata(self, step: int):
        """Shapes and dtypes of the saved params (a pytree of array metadata), read from disk."""
        md = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
        return md.item_metadata.tree["params"]

    def close(self):
        self.manager.close()


@jax.jit
def _count_nonfinite(leaves: list) -> jax.Array:
    """How many leaves hold a non-finite value: one compiled check for the whole tree (one
    eager jnp.all per leaf compiled 18 small programs for the tiny model, ~1.35 s). A scalar,
    so every process of a multi-host run can read it."""
    return sum(jnp.any(~jnp.isfinite(x)).astype(jnp.int32) for x in leaves)


def _check_finite(state) -> None:
    """Never write a non-finite parameter: it would poison every resume."""
    leaves = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return
    n_bad = int(_count_nonfinite(leaves))
    if n_bad:
        raise CheckpointError(f"refusing to save: {n_bad} parameter tensors are non-finite")


# ---------------------------------------------------------------------- params of another run
def is_hf_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors*"))


def _checkpoint_root(path: pathlib.Path) -> pathlib.Path:
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise UserError(f"{path}: not a run dir, orbax checkpoint dir or HF model dir")
    return root


def source_model_config(path: str | pathlib.Path) -> dict | None:
    """The model config (as a dict) of a run dir, checkpoint dir or HF directory."""
    path = pathlib.Path(path)
    if is_hf_dir(path):
        import json

        from jaxllm.interop.hf import config_from_hf
        return dataclasses.asdict(config_from_hf(json.loads((path / "config.json").read_text()),
                                                 str(path / "config.json")))
    ck = Checkpointer(_checkpoint_root(path), CheckpointConfig(), read_only=True)
    try:
        step = ck.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {ck.directory}")
        return ck.read_meta(step).get("model")
    finally:
        ck.close()


def source_tokenizer(path: str | pathlib.Path, step: int | None = None) -> str | None:
    """The fingerprint (data/tokenizer.py) of the tokenizer a run dir / checkpoint was trained
    with, as its checkpoint records it, or of the tokenizer an HF directory ships; None when
    the source names none (synthetic tokens, a checkpoint from before the record, an HF dir
    without tokenizer files)."""
    path = pathlib.Path(path)
    if is_hf_dir(path):
        if not any((path / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
            return None
        from jaxllm.data.tokenizer import fingerprint, load_tokenizer
        try:
            return fingerprint(load_tokenizer(path))
        except (OSError, ValueError, ImportError, UserError):
            return None
    ck = Checkpointer(_checkpoint_root(path), CheckpointConfig(), read_only=True)
    try:
        step = ck.latest_step() if step is None else step
        if step is None or step not in ck.all_steps():
            return None   # load_params names the problem
        return (ck.read_meta(step).get("data_files") or {}).get("tokenizer")
    finally:
        ck.close()


def source_step(path: str | pathlib.Path) -> int | None:
    """The step load_params reads by default: a checkpoint's newest; None for an HF dir."""
    path = pathlib.Path(path)
    if is_hf_dir(path):
        return None
    ck = Checkpointer(_checkpoint_root(path), CheckpointConfig(), read_only=True)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def params_checksum(params) -> list[float]:
    """[sum |x|, sum x^2] over every value: a cheap identity of a frozen base, which a delta or
    reference run records and checks when it is rebuilt (equal up to float rounding on any
    sharding; another model of the same shapes differs in the leading digits)."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    sums = jax.jit(lambda ls: [jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32))),
                                          jnp.sum(jnp.square(x.astype(jnp.float32)))]) for x in ls])(leaves)
    total = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    return [float(total[0]), float(total[1])]


def check_base(ident: dict, params, what: str) -> None:
    """Refuse a base whose checksum is not the one `ident` recorded (path, step, checksum)."""
    now = params_checksum(params)
    if not np.allclose(now, ident["checksum"], rtol=1e-5, atol=0):
        at = f" step {ident['step']}" if ident.get("step") is not None else ""
        raise CheckpointError(f"{what}: its frozen base {ident['path']}{at} is not the model it was trained "
                              f"with (params checksum {now} vs {ident['checksum']} recorded): restore that "
                              f"model there, or start a new run")


def load_params(path: str | pathlib.Path, abstract_params: Any | None = None, step: int | None = None):
    """Params only (never optimizer state), from a run dir (its checkpoints/), a checkpoint
    dir, or an HF directory. -> (params, model config dict or None).

    abstract_params: ShapeDtypeStructs with shardings (the caller's target layout); default:
    the saved shapes and dtypes on this process's first device, so a checkpoint written on
    any device count loads here. step: that checkpoint step (default: the newest)."""
    path = pathlib.Path(path)
    if is_hf_dir(path):
        from jaxllm.interop.hf import load_hf
        shardings = None if abstract_params is None else jax.tree.map(lambda a: a.sharding, abstract_params)
        cfg, params = load_hf(path, shardings=shardings)
        return params, dataclasses.asdict(cfg)
    ck = Checkpointer(_checkpoint_root(path), CheckpointConfig(), read_only=True)
    try:
        if step is not None and step not in ck.all_steps():
            raise CheckpointError(f"{ck.directory} has no step {step} (it has {ck.all_steps()}); the run "
                                  f"that reads it was trained on that step")
        step = ck.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {ck.directory}")
        meta = ck.read_meta(step)
        delta = meta.get("delta")
        if delta and abstract_params is not None:   # a model's layout asked of a delta run
            kind = delta.get("kind", "delta") if isinstance(delta, dict) else "delta"
            base = delta.get("base") if isinstance(delta, dict) else None
            raise UserError(
                f"{path} is a {'LoRA' if kind == 'lora' else kind} run: its checkpoint holds the trained "
                f"delta, not a model. Point at its base{f' ({base})' if base else ''}"
                + (f", or at the merged model: jaxllm convert {path} DIR --to hf, then DIR"
                   if kind == "lora" else ""))
        if abstract_params is None:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            saved = ck.saved_params_metadata(step)
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), saved)
        target = {"params": abstract_params}
        try:
            out = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - orbax raises many types; name the checkpoint
            raise CheckpointError(f"cannot read params from {ck.directory}/{step}: {_one_line(e)}") from e
        params = out["state"]["params"]
        # partial_restore leaves what the checkpoint lacks as the abstract leaf it was asked for
        missing = sorted({jax.tree_util.keystr(p[:1]) for p, x in jax.tree_util.tree_leaves_with_path(params)
                          if isinstance(x, jax.ShapeDtypeStruct)})
        if missing:
            saved = set(ck.saved_params_metadata(step))
            raise CheckpointError(f"{ck.directory}/{step} has no params at {', '.join(missing)} (it has "
                                  f"{sorted(saved)})" + (": a reward model, whose trunk ends in a scalar "
                                  "reward_head, not a language model" if "reward_head" in saved else ""))
        return params, meta.get("model")
    finally:
        ck.close()


def load_policy(path: str | pathlib.Path):
    """The model a run trained, ready for generation or export: params (with a LoRA/adapter
    delta attached over its base, value heads dropped), its model config dict, and the delta
    (kind, config, tree) or None. Plain checkpoints and HF dirs come back as load_params gives
    them. -> (params, model config dict, delta or None)."""
    path = pathlib.Path(path)
    params, model = load_params(path)
    if is_hf_dir(path) or not isinstance(params, dict):
        return params, model, None
    run_dir = path if (path / "checkpoints").is_dir() else path.parent
    ck = Checkpointer(_checkpoint_root(path), CheckpointConfig(), read_only=True)
    try:
        meta = ck.read_meta(ck.latest_step())
    finally:
        ck.close()
    params = {k: v for k, v in params.items() if k != "value_head"}   # an RL critic
    delta_info = meta.get("delta")
    if not delta_info:
        return params, model, None
    if not isinstance(delta_info, dict) or not (run_dir / "config.yaml").exists():
        raise UserError(f"{path}: a delta run, but its base and delta config cannot be found "
                        f"(needs the run dir's config.yaml)")
    from jaxllm.config import load_config
    cfg = load_config(run_dir / "config.yaml")
    delta = params.get("delta", params)
    ident = meta.get("base")
    if ident is None:   # a run from before bases were recorded: its init_from, as written
        print(f"note: {path} does not record its base's step and checksum (an older run): attaching it to "
              f"{delta_info['base']} unchecked", file=sys.stderr)
        base, _ = load_params(delta_info["base"])
    else:
        base, _ = load_params(ident["path"], step=ident.get("step"))
        check_base(ident, base, str(path))
    if delta_info["kind"] == "lora":
        from jaxllm.model import lora as module
        dcfg = cfg.lora
    else:
        from jaxllm.model import adapter as module
        dcfg = cfg.adapter
    # trainable tokens as the ids the run resolved with its tokenizer (older runs: none)
    dcfg = dataclasses.replace(dcfg, trainable_tokens=tuple(delta_info.get("token_ids", ())))
    if getattr(dcfg, "quantize_base", "none") != "none":   # the base as the delta was trained on (QLoRA)
        from jaxllm.model import quant
        base = quant.quantize_tree(base, dcfg.quantize_base, dcfg.quantize_block)
    return module.attach(base, delta, dcfg), model, (delta_info["kind"], dcfg, delta)
