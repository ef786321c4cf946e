"""PEFT LoRA interop against golden fixtures made once with peft (tests/fixtures/peft), both
directions, so CI without torch still checks jaxllm against PEFT's numbers:

  peft -> jaxllm: adapters saved by peft load here and give PeftModel's logits;
  jaxllm -> peft: save_peft still writes exactly the files PEFT was given when the fixture was
  made, and PeftModel's logits on those files equal jaxllm's.
A live round trip runs too where peft itself is importable.
"""
import dataclasses
import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxllm
from jaxllm.config import LoraConfig
from jaxllm.interop.hf import CheckpointFormatError, load_hf
from jaxllm.interop.peft import load_peft, save_peft
from jaxllm.model import lora

FIX = pathlib.Path(__file__).parent / "fixtures" / "peft"
HF_BASE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
forward = jax.jit(jaxllm.forward, static_argnums=2)


@pytest.fixture(scope="module")
def base():
    return load_hf(HF_BASE)


def _export_module():
    spec = importlib.util.spec_from_file_location("jaxllm_export", FIX / "jaxllm_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case,r,alpha,rslora,targets,token_ids", [
    ("peft_all", 4, 8.0, False, sorted(lora.KERNEL_INPUT_DIMS), ()),
    ("peft_qv_rslora", 2, 4.0, True, ["layers/attn/q/kernel", "layers/attn/v/kernel"], ()),
    ("peft_tokens", 2, 4.0, False, ["layers/attn/q/kernel", "layers/attn/v/kernel"], (3, 125)),
])
def test_peft_made_adapter_gives_peft_logits(base, case, r, alpha, rslora, targets, token_ids):
    cfg, params = base
    delta, lora_cfg = load_peft(FIX / case, cfg, base=params)
    assert (lora_cfg.r, lora_cfg.alpha, lora_cfg.rslora) == (r, alpha, rslora)
    assert lora_cfg.trainable_tokens == token_ids and ("tokens" in delta) == bool(token_ids)
    assert lora.delta_paths(delta) == targets
    ref = np.load(FIX / case / "reference.npz")
    np.testing.assert_allclose(forward(params, ref["input_ids"], cfg), ref["base_logits"],
                               atol=1e-4, rtol=1e-4)
    adapted = forward(lora.attach(params, delta, lora_cfg), ref["input_ids"], cfg)
    np.testing.assert_allclose(adapted, ref["logits"], atol=1e-4, rtol=1e-4)
    merged = forward(lora.merge(params, delta, lora_cfg), ref["input_ids"], cfg)
    np.testing.assert_allclose(merged, ref["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["jaxllm_export", "jaxllm_tokens"])
def test_jaxllm_export_is_what_peft_was_given_and_gives_peft_logits(tmp_path, base, case):
    cfg, params = base
    export = _export_module()
    lora_cfg = LoraConfig(**export.CASES[case])
    delta = export.make_delta(params, lora_cfg)
    save_peft(tmp_path, cfg, delta, lora_cfg, base=params)
    committed = FIX / case
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == \
        json.loads((committed / "adapter_config.json").read_text())
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path, committed))
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    ref = np.load(committed / "reference.npz")
    adapted = forward(lora.attach(params, delta, lora_cfg), ref["input_ids"], cfg)
    np.testing.assert_allclose(adapted, ref["logits"], atol=1e-4, rtol=1e-4)


def test_save_then_load_round_trips_exactly(tmp_path, base):
    cfg, params = base
    delta, lora_cfg = load_peft(FIX / "peft_all", cfg)
    save_peft(tmp_path, cfg, delta, lora_cfg)
    delta2, lora_cfg2 = load_peft(tmp_path, cfg)
    assert lora_cfg2 == lora_cfg
    jax.tree.map(np.testing.assert_array_equal, delta2, delta)
    # token rows travel whole (base + change) and come back as the change, to fp32 rounding
    delta, lora_cfg = load_peft(FIX / "peft_tokens", cfg, base=params)
    save_peft(tmp_path / "t", cfg, delta, lora_cfg, base=params)
    delta2, lora_cfg2 = load_peft(tmp_path / "t", cfg, base=params)
    assert lora_cfg2 == lora_cfg
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), delta2, delta)


def test_token_rows_need_the_base_and_matching_ids(tmp_path, base):
    cfg, params = base
    with pytest.raises(CheckpointFormatError, match="load_peft needs the base params"):
        load_peft(FIX / "peft_tokens", cfg)
    delta, lora_cfg = load_peft(FIX / "peft_tokens", cfg, base=params)
    with pytest.raises(CheckpointFormatError, match="save_peft needs base="):
        save_peft(tmp_path / "a", cfg, delta, lora_cfg)
    d = _copy(tmp_path, "peft_tokens")
    conf = json.loads((d / "adapter_config.json").read_text())
    conf["trainable_token_indices"] = {"embed_tokens": [3, 125], "lm_head": [3]}
    (d / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointFormatError, match="embed_tokens and lm_head train different tokens"):
        load_peft(d, cfg, base=params)
    conf["trainable_token_indices"] = [3, 125, 7]
    (d / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointFormatError, match=r"token_adapter\.trainable_tokens_delta' has shape \(2, 64\); "
                       r"3 token rows"):
        load_peft(d, cfg, base=params)


# ---------------------------------------------------------------- bad input
def test_shapes_that_do_not_fit_the_base_name_the_tensor(base):
    cfg, _ = base
    with pytest.raises(CheckpointFormatError, match=r"tensor 'base_model\.model\.model\.layers\.0\.mlp\."
                       r"gate_proj\.lora_B\.weight' has shape \(128, 4\); .* needs \(96, 4\)"):
        load_peft(FIX / "peft_all", dataclasses.replace(cfg, d_ff=96))


def _copy(tmp_path, case="peft_all") -> pathlib.Path:
    out = tmp_path / case
    shutil.copytree(FIX / case, out)
    return out


def test_unsupported_peft_options_are_refused_by_name(tmp_path, base):
    cfg, _ = base
    d = _copy(tmp_path)
    config = json.loads((d / "adapter_config.json").read_text())
    config.update(use_dora=True, rank_pattern={"q_proj": 8})
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError,
                       match=r"rank_pattern=\{'q_proj': 8\}, use_dora=True not supported"):
        load_peft(d, cfg)


def test_tensors_that_are_not_layer_lora_factors_are_named(tmp_path, base):
    cfg, _ = base
    d = _copy(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(CheckpointFormatError,
                       match=r"tensors \['base_model\.model\.lm_head\.lora_A\.weight'\]"):
        load_peft(d, cfg)
    del tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"'base_model\.model\.model\.layers\.1\.self_attn\."
                       r"k_proj\.lora_B\.weight' is missing"):
        load_peft(d, cfg)


# ---------------------------------------------------------------- live, where peft is installed
def test_live_round_trip_with_peft(tmp_path, base):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params = base
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))

    def hf_model():
        return transformers.LlamaForCausalLM.from_pretrained(
            HF_BASE, attn_implementation="eager", dtype=torch.float32).eval()

    def peft_logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()

    # peft -> jaxllm
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(), peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "from_peft")
    delta, lora_cfg = load_peft(tmp_path / "from_peft", cfg)
    np.testing.assert_allclose(forward(lora.attach(params, delta, lora_cfg), ids, cfg), peft_logits(model),
                               atol=1e-4, rtol=1e-4)
    # jaxllm -> peft
    lora_cfg = LoraConfig(r=3, alpha=8.0)
    delta = _export_module().make_delta(params, lora_cfg, seed=1)
    save_peft(tmp_path / "from_jaxllm", cfg, delta, lora_cfg)
    model = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "from_jaxllm")
    ours = forward(lora.attach(params, delta, lora_cfg), ids, cfg)
    np.testing.assert_allclose(ours, peft_logits(model), atol=1e-4, rtol=1e-4)
    assert np.abs(ours - forward(params, ids, cfg)).max() > 0.1
