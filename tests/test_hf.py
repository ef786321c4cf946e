"""HF interop against golden fixtures made once with transformers (tests/fixtures/hf)."""
import json
import pathlib

import chex
import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.interop.hf import CheckpointFormatError, load_hf, save_hf

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"
CASES = ["llama_gqa", "llama_tied", "qwen2", "mistral", "llama_sharded", "llama31_rope"]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    cfg, params = load_hf(FIX / case)
    ref = np.load(FIX / case / "reference.npz")
    logits = jaxllm.forward(params, ref["input_ids"], cfg)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    # non-contiguous positions (RoPE must use them, as HF's position_ids do)
    logits = jaxllm.forward(params, ref["input_ids"], cfg, positions=ref["position_ids_gapped"])
    np.testing.assert_allclose(logits, ref["logits_positions_gapped"], atol=1e-4, rtol=1e-4)


def test_llama31_rope_scaling_is_read_and_matters():
    cfg, params = load_hf(FIX / "llama31_rope")
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 16.0) and cfg.rope_theta == 5e5
    ref = np.load(FIX / "llama31_rope" / "reference.npz")
    import dataclasses
    unscaled = jaxllm.forward(params, ref["input_ids"], dataclasses.replace(cfg, rope_scaling=()),
                              positions=ref["position_ids_gapped"])
    # the fixture is sensitive: ignoring the scaling misses HF's logits by far more than 1e-4
    assert float(np.max(np.abs(unscaled - ref["logits_positions_gapped"]))) > 1e-2


def test_rope_type_default_is_unscaled_rope_and_other_types_are_refused():
    from jaxllm.interop.hf import config_from_hf
    hf = json.loads((FIX / "llama_gqa" / "config.json").read_text())
    plain = config_from_hf(hf)
    for scaling in ({"rope_type": "default"}, {"type": "default"}, {"rope_type": "default", "rope_theta": 1e4}):
        assert config_from_hf(dict(hf, rope_scaling=scaling)) == plain
    with pytest.raises(CheckpointFormatError, match="rope scaling 'yarn' is not supported"):
        config_from_hf(dict(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_config_fields_are_read():
    cfg, _ = load_hf(FIX / "qwen2")
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_theta == 1e6 and cfg.n_kv_heads == 2
    cfg, _ = load_hf(FIX / "llama_tied")   # transformers-4 layout: top-level rope_theta
    assert cfg.tie_embeddings and cfg.rope_theta == 5e5 and cfg.norm_eps == 1e-6
    cfg, _ = load_hf(FIX / "llama_gqa")
    assert not cfg.tie_embeddings and not cfg.qkv_bias and cfg.n_kv_heads == 2


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "llama_tied"])
def test_save_then_load_round_trips_exactly(tmp_path, case):
    cfg, params = load_hf(FIX / case)
    save_hf(tmp_path, cfg, params)
    cfg2, params2 = load_hf(tmp_path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params, params2)
    # same tensor names as transformers writes (a tied model has no lm_head.weight)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f, \
            safe_open(str(FIX / case / "model.safetensors"), "numpy") as g:
        assert set(f.keys()) == set(g.keys())


def test_sharded_save_writes_index_and_loads(tmp_path):
    cfg, params = load_hf(FIX / "llama_gqa")
    save_hf(tmp_path, cfg, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    _, params2 = load_hf(tmp_path)
    chex.assert_trees_all_equal(params, params2)


def test_random_init_model_round_trips(tmp_path):
    cfg = jaxllm.ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1, d_ff=48)
    params = jaxllm.init_params(cfg, jax.random.key(1))
    jaxllm.save_hf(tmp_path, cfg, params)
    cfg2, params2 = jaxllm.load_hf(tmp_path)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params, params2)


def test_bad_checkpoints_fail_with_clear_messages(tmp_path):
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointFormatError, match="GPT2LMHeadModel.*not supported"):
        load_hf(tmp_path)
    cfg = json.loads((FIX / "llama_gqa" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="no model.safetensors"):
        load_hf(tmp_path)
    cfg["num_hidden_layers"] = 3   # the file has 2 layers
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((FIX / "llama_gqa" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointFormatError, match="model.layers.2.*missing"):
        load_hf(tmp_path)


def test_resave_into_the_same_directory_replaces_every_file(tmp_path):
    cfg, params = load_hf(FIX / "llama_gqa")
    save_hf(tmp_path, cfg, params, max_shard_bytes=100_000)        # sharded, with an index
    new = jax.tree.map(lambda x: x * 2, params)
    save_hf(tmp_path, cfg, new)                                     # now a single file
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    _, loaded = load_hf(tmp_path)
    chex.assert_trees_all_equal(loaded, new)


def test_convert_refuses_to_write_into_its_source_or_a_run_dir(tmp_path):
    from jaxllm.interop.cli import convert
    run = tmp_path / "run"   # a run dir: config.yaml + checkpoints/ (here an orbax export of a fixture)
    convert(str(FIX / "llama_gqa"), str(run / "checkpoints"), "orbax")
    (run / "config.yaml").write_text("train: {seq_len: 64}\n")
    before = sorted(p.name for p in run.iterdir())
    for src, dst, to, message in ((run, run, "hf", "is the source itself"),
                                  (run, tmp_path / "x" / ".." / "run", "hf", "is the source itself"),
                                  (run / "checkpoints", run / "checkpoints", "hf", "is the source itself"),
                                  (FIX / "llama_gqa", run, "hf", "is a run dir"),
                                  (FIX / "llama_gqa", run, "orbax", "is a run dir")):
        with pytest.raises(jaxllm.UserError, match=message):
            convert(str(src), str(dst), to, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before   # nothing written there
