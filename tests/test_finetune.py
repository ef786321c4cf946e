"""LoRA / adapter runs through the one recipe and the one step: the base is the frozen
argument, read from checkpoint.init_from; only the delta is trained, saved and resumed."""
import json

import chex
import jax
import numpy as np
import pytest

import jaxllm

ARGS = ["model=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "optim.warmup_steps=0", "mesh.devices=1",
        "checkpoint.async_save=false", "optim.decay_steps=10", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=4", f"train.run_dir={d}"]))
    return d, jax.device_get(s["state"].params)


@pytest.mark.slow
@pytest.mark.parametrize("delta", [["lora.r=4"], ["adapter.size=8"]], ids=["lora", "adapter"])
def test_delta_run_trains_only_the_delta_and_resumes_exactly(tmp_path, base, delta):
    base_dir, base_params = base
    args = ARGS + delta + [f"checkpoint.init_from={base_dir}"]
    full = jaxllm.train(jaxllm.load_config(None, args + ["train.steps=6", f"train.run_dir={tmp_path}/a"]))
    # the frozen base is the source run's params, bit for bit, after training
    chex.assert_trees_all_equal(jax.device_get(full["frozen"]), base_params)
    trained = jax.device_get(full["state"].params)
    assert "layers" in trained and "embed" not in trained          # the state holds the delta only
    assert all(np.isfinite(h["loss"]) for h in full["history"])
    # it moved: LoRA's B / the adapters' up-projections start at zero
    zero_at_init = [v for k, v in jax.tree_util.tree_flatten_with_path(trained)[0]
                    if "'b'" in jax.tree_util.keystr(k) or "'up'" in jax.tree_util.keystr(k)]
    assert zero_at_init and all(np.abs(v).max() > 0 for v in zero_at_init)
    # interrupted at 4 then resumed to 6: the same losses as the uninterrupted run
    jaxllm.train(jaxllm.load_config(None, args + ["train.steps=4", "checkpoint.every=2",
                                                  f"train.run_dir={tmp_path}/b"]))
    resumed = jaxllm.train(jaxllm.load_config(None, args + ["train.steps=6", f"train.run_dir={tmp_path}/b"]))
    assert resumed["resumed_from"] == 4
    rows = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "b/metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    np.testing.assert_allclose([rows[s] for s in range(1, 7)], [h["loss"] for h in full["history"]], rtol=1e-6)


def test_a_delta_run_rebuilds_its_own_base_from_any_directory_or_refuses(tmp_path, monkeypatch):
    """A LoRA run records its base's absolute path, step and checksum: generation/export from
    another working directory attach the same base, and a base that has changed since (trained
    further, or another model put at that path) is refused in one line, also on resume."""
    from jaxllm.training.checkpoint import CheckpointError, load_policy
    monkeypatch.chdir(tmp_path)
    jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=2", "checkpoint.every=2", "train.run_dir=base"]))
    lora_args = ARGS + ["lora.r=4", "checkpoint.init_from=base", "checkpoint.every=2"]
    s = jaxllm.train(jaxllm.load_config(None, lora_args + ["train.steps=2", "train.run_dir=lora"]))
    meta_base = json.loads((tmp_path / "lora/checkpoints/2/meta/metadata").read_text())["base"]
    assert meta_base["path"] == str(tmp_path / "base") and meta_base["step"] == 2
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")          # "base" means nothing here
    params, _, _ = load_policy(tmp_path / "lora")
    chex.assert_trees_all_equal(jax.device_get(params["embed"]), jax.device_get(s["frozen"]["embed"]))
    monkeypatch.chdir(tmp_path)
    # the base trained on: its step 2 is still there, so the delta still gets it
    jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=4", "checkpoint.every=2", "train.run_dir=base"]))
    load_policy(tmp_path / "lora")
    # another model of the same shapes at that path and step: refused
    import shutil
    shutil.rmtree(tmp_path / "base")
    jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=2", "train.seed=7", "checkpoint.every=2",
                                                  "train.run_dir=base"]))
    with pytest.raises(CheckpointError, match=r"frozen base .*base step 2 is not the model it was trained with"):
        load_policy(tmp_path / "lora")
    with pytest.raises(CheckpointError, match=r"is not the model it was trained with"):
        jaxllm.train(jaxllm.load_config(None, lora_args + ["train.steps=4", "train.run_dir=lora"]))


@pytest.mark.slow
def test_lora_run_writes_a_peft_adapter_that_loads_back(tmp_path, base):
    base_dir, _ = base
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["lora.r=4", "train.steps=2", f"train.run_dir={tmp_path}",
                                                      f"checkpoint.init_from={base_dir}"]))
    from jaxllm.interop.peft import load_peft
    cfg = jaxllm.load_config(None, ARGS).model
    delta, lcfg = load_peft(tmp_path / "adapter", cfg)
    assert lcfg.r == 4
    chex.assert_trees_all_close(delta, jax.device_get(s["state"].params), atol=0)
    # a LoRA run as another run's init_from: its checkpoint is a delta, said in one line
    with pytest.raises(jaxllm.UserError, match=rf"is a LoRA run: its checkpoint holds the trained delta.*"
                                               rf"Point at its base \({base_dir}\).*--to hf"):
        jaxllm.train(jaxllm.load_config(None, ARGS + ["train.steps=1", f"train.run_dir={tmp_path}/next",
                                                      f"checkpoint.init_from={tmp_path}"]))


def test_a_delta_without_a_base_is_refused(tmp_path):
    with pytest.raises(jaxllm.ConfigError, match="set checkpoint.init_from"):
        jaxllm.train(jaxllm.load_config(None, ARGS + ["lora.r=4", f"train.run_dir={tmp_path}"]))


def test_a_lora_run_exports_merged_to_hf_and_as_peft_and_generates(tmp_path, base):
    base_dir, _ = base
    run = tmp_path / "run"
    jaxllm.train(jaxllm.load_config(None, ARGS + ["lora.r=4", "train.steps=2", f"train.run_dir={run}",
                                                  f"checkpoint.init_from={base_dir}"]))
    from jaxllm.interop.cli import convert
    from jaxllm.training.checkpoint import load_policy
    params, model, delta = load_policy(run)
    assert delta is not None and delta[0] == "lora" and "lora" in params
    convert(str(run), str(tmp_path / "hf"), "hf")
    cfg, merged = jaxllm.load_hf(tmp_path / "hf")
    tokens = np.arange(12, dtype=np.int32)[None] % cfg.vocab_size
    np.testing.assert_allclose(jaxllm.forward(merged, tokens, cfg), jaxllm.forward(params, tokens, cfg),
                               atol=1e-5)   # merged W + sBA == base + delta applied in the layers
    convert(str(run), str(tmp_path / "peft"), "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    with pytest.raises(jaxllm.UserError, match="exports a LoRA run's adapter"):
        convert(str(base_dir), str(tmp_path / "peft2"), "peft")


def test_a_lora_run_with_trainable_tokens_trains_their_rows_and_exports_merged(tmp_path, base):
    base_dir, base_params = base
    run = tmp_path / "run"
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["lora.r=4", "lora.trainable_tokens=[3,5]", "train.steps=2",
                                                      f"train.run_dir={run}", f"checkpoint.init_from={base_dir}"]))
    chex.assert_trees_all_equal(jax.device_get(s["frozen"]), base_params)   # the base is untouched
    rows = jax.device_get(s["state"].params)["tokens"]
    assert {k: v.shape for k, v in rows.items()} == {"embed": (2, 64), "unembed": (2, 64)}
    assert np.abs(rows["unembed"]).min(axis=1).max() > 0                    # the rows trained
    from jaxllm.interop.cli import convert
    from jaxllm.interop.peft import load_peft
    from jaxllm.model import lora
    from jaxllm.training.checkpoint import load_policy
    params, _, delta = load_policy(run)
    assert delta[1].trainable_tokens == (3, 5) and "tokens" in params
    convert(str(run), str(tmp_path / "hf"), "hf")
    cfg, merged = jaxllm.load_hf(tmp_path / "hf")
    ids = np.array([[1, 3, 4, 5, 6, 3, 7, 8]], np.int32)
    want = jaxllm.forward(params, ids, cfg)
    np.testing.assert_allclose(jaxllm.forward(merged, ids, cfg), want, atol=1e-5)
    # the run's PEFT adapter (and `convert --to peft`) carries the rows whole: read back onto
    # the base it gives the run's logits (the golden PEFT fixtures check PEFT reads them so)
    convert(str(run), str(tmp_path / "peft"), "peft")
    for adapter in (run / "adapter", tmp_path / "peft"):
        d, lcfg = load_peft(adapter, cfg, base=base_params)
        assert lcfg.trainable_tokens == (3, 5) and set(d["tokens"]) == {"embed", "unembed"}
        np.testing.assert_allclose(jaxllm.forward(lora.attach(base_params, d, lcfg), ids, cfg), want, atol=1e-5)


@pytest.mark.parametrize("targets", [[], ["lora.targets=layers/attn/q/kernel"]], ids=["all", "q-only"])
def test_a_qlora_run_trains_over_an_nf4_base_and_reloads_and_exports_it(tmp_path, base, capsys, targets):
    base_dir, base_params = base
    run = tmp_path / "run"
    s = jaxllm.train(jaxllm.load_config(None, ARGS + ["lora.r=4", "lora.quantize_base=nf4", "train.steps=3",
                                                      f"train.run_dir={run}", f"checkpoint.init_from={base_dir}",
                                                      *targets]))
    from jaxllm.model import lora, quant
    frozen = jax.device_get(s["frozen"])
    want_base = quant.quantize_tree(base_params, "nf4", 64)
    chex.assert_trees_all_equal(frozen, want_base)                 # the base is the source run's, quantized
    log = capsys.readouterr().err
    assert "quantized the frozen base's layer matrices to nf4" in log and "codes" in log, log
    assert "16 in layers/attn/o/kernel" in log, log     # head_dim 16 < 64: the smaller block is said
    assert all(np.isfinite(h["loss"]) for h in s["history"])
    trained = jax.device_get(s["state"].params)
    block, name = ("attn", "q") if targets else ("mlp", "up")
    assert np.abs(trained["layers"][block][name]["kernel"]["b"]).max() > 0   # B left zero: it trained
    # load_policy rebuilds the base the delta was trained on (quantized), so generation and
    # evaluation see the trained function; the HF export folds the dequantized kernels
    from jaxllm.interop.cli import convert
    from jaxllm.training.checkpoint import load_policy
    params, _, delta = load_policy(run)
    assert isinstance(params["layers"]["mlp"]["up"]["kernel"], quant.QuantizedKernel)
    ids = np.array([[1, 3, 4, 5, 6, 3, 7, 8]], np.int32)
    cfg = jaxllm.load_config(None, ARGS).model
    want = jaxllm.forward(lora.attach(want_base, jax.device_get(s["state"].params), delta[1]), ids, cfg)
    np.testing.assert_allclose(jaxllm.forward(params, ids, cfg), want, atol=1e-6)
    # q-only: the kernels LoRA does not adapt are still quantized after the merge
    assert "the nf4 base dequantized" in convert(str(run), str(tmp_path / "hf"), "hf")
    hf_cfg, merged = jaxllm.load_hf(tmp_path / "hf")
    np.testing.assert_allclose(jaxllm.forward(merged, ids, hf_cfg), want, atol=1e-5)
