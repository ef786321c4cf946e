"""HF transformers checkpoints <-> (ModelConfig, params), tensor by tensor.

Reads config.json + model.safetensors (or sharded with model.safetensors.index.json) of
LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM; writes files transformers loads.
Reward models are their *ForSequenceClassification twins (num_labels=1): the same trunk
tensors, no lm_head, and `score.weight` (1, hidden) = our params["reward_head"]["kernel"]
(d,). transformers reads the score at each row's rightmost token that is not
config.pad_token_id, so an export names a pad id distinct from eos and inputs are padded with it.
Layers are stacked along a leading axis here (nn.scan) and separate tensors there; a torch
Linear weight is (out, in) and our kernels are (in, ..., out), hence the transposes.
Memory: one stacked tensor is built on the host at a time and moved to the device before
the next, so a model is never held twice.
"""
from __future__ import annotations

import json
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# reward models: the sequence-classification class of each supported causal LM
SEQUENCE_CLASSIFICATION = {a.replace("ForCausalLM", "ForSequenceClassification"): a for a in SUPPORTED}


class CheckpointFormatError(UserError):
    pass


# ---------------------------------------------------------------- config.json <-> ModelConfig

def hf_head(hf: dict) -> str:
    """"reward" for a *ForSequenceClassification config.json, else "lm"."""
    return "reward" if (hf.get("architectures") or [None])[0] in SEQUENCE_CLASSIFICATION else "lm"


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    arch = (hf.get("architectures") or [None])[0]
    if arch in SEQUENCE_CLASSIFICATION:
        # transformers keeps num_labels as len(id2label); absent, its default is 2
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        if labels != 1:
            raise CheckpointFormatError(f"{source}: {arch} with {labels} labels; a reward model has "
                                        f"num_labels=1 (one scalar score)")
        arch = SEQUENCE_CLASSIFICATION[arch]
    if arch not in SUPPORTED:
        raise CheckpointFormatError(f"{source}: architecture {arch!r} is not supported; "
                                    f"supported: {list(SUPPORTED) + list(SEQUENCE_CLASSIFICATION)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"{source}: hidden_act {hf['hidden_act']!r}; only silu (SwiGLU)")
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling: tuple = ()
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if scaling and kind != "default":   # transformers' "default" rope type is unscaled RoPE
        if kind != "llama3":
            raise CheckpointFormatError(f"{source}: rope scaling {kind!r} is not supported (llama3 is)")
        rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]),
                        float(scaling["original_max_position_embeddings"]))
    window = hf.get("sliding_window")
    if window and (arch == "MistralForCausalLM" or hf.get("use_sliding_window")):
        warnings.warn(f"{source}: sliding_window={window} is ignored (full attention); exact for "
                      f"sequences up to {window} tokens")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim == hf["hidden_size"] // n_heads:
        head_dim = 0   # the default geometry, so configs compare equal after a round trip
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=hf["intermediate_size"], rope_theta=float(theta), rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    out = {
        "architectures": [arch], "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_per_head, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "torch_dtype": dtype,
        "attention_bias": cfg.qkv_bias, "mlp_bias": False,
    }
    if cfg.qkv_bias:
        out["use_sliding_window"] = False
    if cfg.rope_scaling:
        f, lo, hi, orig = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                               "high_freq_factor": hi, "original_max_position_embeddings": int(orig)}
    return out


# ---------------------------------------------------------------- parameter name mapping

def _layer_map(cfg: ModelConfig):
    """(our path, HF name template, torch->ours transform, ours->torch transform) per tensor."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head
    pre = "model.layers.{i}."
    t = lambda shape: (lambda w: w.T.reshape(shape))  # noqa: E731  (out, in) -> (in, *out)
    back = lambda w: w.reshape(w.shape[0], -1).T      # noqa: E731  (in, *out) -> (out, in)
    entries = [
        (("attn_norm", "scale"), pre + "input_layernorm.weight", None, None),
        (("mlp_norm", "scale"), pre + "post_attention_layernorm.weight", None, None),
        (("attn", "q", "kernel"), pre + "self_attn.q_proj.weight", t((d, n, h)), back),
        (("attn", "k", "kernel"), pre + "self_attn.k_proj.weight", t((d, k, h)), back),
        (("attn", "v", "kernel"), pre + "self_attn.v_proj.weight", t((d, k, h)), back),
        (("attn", "o", "kernel"), pre + "self_attn.o_proj.weight", t((n, h, d)),
         lambda w: w.reshape(-1, w.shape[-1]).T),
        (("mlp", "gate", "kernel"), pre + "mlp.gate_proj.weight", t((d, cfg.d_ff)), back),
        (("mlp", "up", "kernel"), pre + "mlp.up_proj.weight", t((d, cfg.d_ff)), back),
        (("mlp", "down", "kernel"), pre + "mlp.down_proj.weight", t((cfg.d_ff, d)), back),
    ]
    if cfg.qkv_bias:
        entries += [
            (("attn", "q", "bias"), pre + "self_attn.q_proj.bias", lambda b: b.reshape(n, h), lambda b: b.reshape(-1)),
            (("attn", "k", "bias"), pre + "self_attn.k_proj.bias", lambda b: b.reshape(k, h), lambda b: b.reshape(-1)),
            (("attn", "v", "bias"), pre + "self_attn.v_proj.bias", lambda b: b.reshape(k, h), lambda b: b.reshape(-1)),
        ]
    return entries


def _top_map(cfg: ModelConfig, head: str = "lm"):
    """head "lm": lm_head.weight (unless tied); "reward": score.weight (1, d) <-> kernel (d,)."""
    entries = [(("embed", "embedding"), "model.embed_tokens.weight", None, None),
               (("final_norm", "scale"), "model.norm.weight", None, None)]
    if head == "reward":
        entries.append((("reward_head", "kernel"), "score.weight", lambda w: w[0], lambda w: w[None]))
    elif not cfg.tie_embeddings:
        entries.append((("lm_head", "kernel"), "lm_head.weight", lambda w: w.T, lambda w: w.T))
    return entries


def _set(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


# ---------------------------------------------------------------- reading

class _TensorReader:
    """Name -> tensor across one or several safetensors files, opening each file lazily."""

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open
        self._open = safe_open
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / f for name, f in weight_map.items()}
        elif single.exists():
            with safe_open(str(single), framework="flax") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise CheckpointFormatError(f"{directory}: no model.safetensors or "
                                        f"model.safetensors.index.json found")
        self.directory = directory
        self._handles: dict = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise CheckpointFormatError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        path = self.files[name]
        if path not in self._handles:
            if not path.exists():
                raise CheckpointFormatError(f"{path}: shard listed in the index does not exist")
            # framework="flax" reads bf16 too (numpy has no bf16 of its own).
            self._handles[path] = self._open(str(path), framework="flax").__enter__()
        return np.asarray(self._handles[path].get_tensor(name))

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)


def load_hf(directory: str | pathlib.Path, dtype: str | None = None, shardings=None):
    """-> (ModelConfig, params). `dtype` casts weights (default: keep the file's dtype, with
    param_dtype set to match); `shardings` (pytree like params) places each tensor as it loads.
    A *ForSequenceClassification checkpoint (a reward model) gives params with
    "reward_head" and no "lm_head" (pad its inputs with config.json's pad_token_id)."""
    directory = pathlib.Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointFormatError(f"{directory}: no config.json (expected an HF model directory)")
    hf = json.loads(cfg_path.read_text())
    cfg, head = config_from_hf(hf, str(cfg_path)), hf_head(hf)
    reader = _TensorReader(directory)
    params: dict = {}
    used: set[str] = set()
    file_dtype = None

    def place(path, host):
        arr = host if dtype is None else host.astype(dtype)
        sh = _get(shardings, path) if shardings is not None else None
        _set(params, path, jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr))

    try:
        for path, name, to_ours, _ in _top_map(cfg, head):
            w = reader.get(name)
            file_dtype = file_dtype or w.dtype
            used.add(name)
            place(path, to_ours(w) if to_ours else w)
        for path, template, to_ours, _ in _layer_map(cfg):
            stacked = None
            for i in range(cfg.n_layers):
                name = template.format(i=i)
                w = reader.get(name)
                used.add(name)
                w = to_ours(w) if to_ours else w
                if stacked is None:
                    stacked = np.empty((cfg.n_layers,) + w.shape, w.dtype)
                stacked[i] = w
            place(("layers",) + path, stacked)
            del stacked
    finally:
        reader.close()
    extra = sorted(set(reader.files) - used - {"lm_head.weight"})
    extra = [e for e in extra if not e.endswith("rotary_emb.inv_freq")]
    if extra:
        raise CheckpointFormatError(f"{directory}: unexpected tensors {extra[:5]} "
                                    f"({len(extra)} in all) for {cfg}")
    param_dtype = str(jnp.dtype(dtype or file_dtype))
    if param_dtype in ("float32", "bfloat16", "float16"):
        import dataclasses
        cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
    return cfg, params


# ---------------------------------------------------------------- writing

def reward_config_to_hf(cfg: ModelConfig, dtype: str, pad_token_id: int, eos_token_id: int | None) -> dict:
    """config.json of the *ForSequenceClassification twin, one label, with the pad id
    transformers uses to find each row's last real token."""
    out = config_to_hf(cfg, dtype)
    out["architectures"] = [out["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=int(pad_token_id))
    if eos_token_id is not None:
        out["eos_token_id"] = int(eos_token_id)
    return out


def _check_head(params, head: str, pad_token_id, eos_token_id) -> None:
    if head not in ("lm", "reward"):
        raise ValueError(f"save_hf: head must be 'lm' or 'reward', got {head!r}")
    if head == "lm" and "reward_head" in params and "lm_head" not in params:
        raise ValueError("save_hf: these params are a reward model (reward_head, no lm_head); "
                         "pass head='reward' and pad_token_id")
    if head == "reward":
        if "reward_head" not in params:
            raise ValueError("save_hf(head='reward'): params have no 'reward_head'")
        if pad_token_id is None:
            raise ValueError("save_hf(head='reward') needs pad_token_id: transformers scores each "
                             "row at its last token that is not the pad id")
        if eos_token_id is not None and int(pad_token_id) == int(eos_token_id):
            raise ValueError(f"save_hf(head='reward'): pad_token_id={pad_token_id} equals eos_token_id; "
                             f"transformers would read the score before each row's eos, not at it")


_EXPORT_FILE = re.compile(r"model(-\d{5}-of-\d{5}|-\d{5}\.partial)?\.safetensors|model\.safetensors\.index\.json")


def save_hf(directory: str | pathlib.Path, cfg: ModelConfig, params, max_shard_bytes: int = 2 << 30, *,
            head: str = "lm", pad_token_id: int | None = None, eos_token_id: int | None = None,
            bos_token_id: int | None = None):
    """Write config.json + safetensors (sharded with an index above max_shard_bytes).
    Tensors are pulled from the device one at a time; at most one shard is buffered.
    The token ids given are written into config.json (transformers' generate() stops on its
    eos_token_id; unset, LlamaConfig assumes bos=1, eos=2): pass those of the model's tokenizer.
    head="reward": a *ForSequenceClassification (num_labels=1) of params["reward_head"]
    (params["lm_head"], if any, is left out), with pad_token_id (required; must differ from
    eos_token_id when that is given) in config.json."""
    from safetensors.numpy import save_file
    _check_head(params, head, pad_token_id, eos_token_id)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A previous export's index or shards would shadow (or mix with) this one on load. Only the
    # names an export writes go: model.safetensors, model-00001-of-00003.safetensors, the index,
    # and a killed export's model-00001.partial.safetensors; any other file stays.
    for old in directory.glob("model*.safetensors*"):
        if _EXPORT_FILE.fullmatch(old.name):
            old.unlink(missing_ok=True)

    def tensors():
        for path, name, _, to_torch in _top_map(cfg, head):
            w = np.asarray(jax.device_get(_get(params, path)))
            yield name, w if to_torch is None else to_torch(w)
        for i in range(cfg.n_layers):
            for path, template, _, to_torch in _layer_map(cfg):
                w = np.asarray(jax.device_get(_get(params, ("layers",) + path)[i]))
                yield template.format(i=i), w if to_torch is None else to_torch(w)

    total = 0   # bytes written (an unexported lm_head does not count)
    buf: dict = {}
    size = 0
    written: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal buf, size
        if not buf:
            return
        idx = len(written) + 1
        # shard files are renamed once their count is known (it depends on tensor sizes)
        tmp = directory / f"model-{idx:05d}.partial.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in buf.items()}, str(tmp), metadata={"format": "pt"})
        written.append((tmp.name, list(buf)))
        buf, size = {}, 0

    for name, w in tensors():
        nbytes = w.size * w.dtype.itemsize
        total += nbytes
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[name] = w
        size += nbytes
    flush()
    if len(written) == 1:
        (directory / written[0][0]).rename(directory / "model.safetensors")
    else:
        n = len(written)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (directory / tmp_name).rename(directory / final)
            weight_map.update({nm: final for nm in names})
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype = str(jnp.dtype(jax.tree.leaves(params)[0].dtype))
    hf = (config_to_hf(cfg, dtype) if head == "lm" else
          reward_config_to_hf(cfg, dtype, pad_token_id, eos_token_id))
    hf.update({k: int(v) for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                      ("pad_token_id", pad_token_id)) if v is not None})
    (directory / "config.json").write_text(json.dumps(hf, indent=2))


# ---------------------------------------------------------------- tokenizer files

# Files a tokenizer export writes (and an --overwrite removes first: a stale tokenizer.json
# would be read instead of a new tokenizer.model).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")
# jaxllm's built-in ChatML (data/chat.py) as the Jinja template transformers renders
CHATML_JINJA = ("{% if bos_token %}{{ bos_token }}{% endif %}"
                "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_tokenizer(directory: str | pathlib.Path, tokenizer: str | pathlib.Path,
                   chat_template: str | None = None):
    """Copy the tokenizer at `tokenizer` (what load_tokenizer reads: ours or an HF tokenizer.json
    with its tokenizer_config.json / chat_template.jinja) into `directory`, where load_tokenizer
    and transformers' AutoTokenizer find it. `chat_template` (Jinja source): written into
    tokenizer_config.json in place of the tokenizer's own. Returns the loaded tokenizer."""

    from jaxllm.data.chat import special_tokens
    from jaxllm.data.tokenizer import load_tokenizer
    directory = pathlib.Path(directory)
    tok = load_tokenizer(tokenizer)
    # the files to write, read before any is removed (the source may be `directory` itself)
    files: dict[str, bytes] = {}
    config: dict = {}
    if hasattr(tok, "sp"):   # SentencePiece: tokenizer.model (all load_tokenizer needs)
        files["tokenizer.model"] = pathlib.Path(tok.path).read_bytes()
        config = {"tokenizer_class": "LlamaTokenizer", **special_tokens(tok)}
        if tok.chat_template is not None:   # its dir's own template (tokenizer_config.json or .jinja)
            config["chat_template"] = tok.chat_template
    else:                    # HF: tokenizer.json and the files beside it that define it
        source = pathlib.Path(tok.path)
        files["tokenizer.json"] = source.read_bytes()
        for name in TOKENIZER_FILES[2:]:
            if (source.parent / name).is_file():
                files[name] = (source.parent / name).read_bytes()
        if "tokenizer_config.json" in files:
            config = json.loads(files["tokenizer_config.json"].decode("utf-8"))
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    if chat_template is not None:
        (directory / "chat_template.jinja").unlink(missing_ok=True)   # it would win over config's
        config["chat_template"] = chat_template
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                         encoding="utf-8")
    return tok
