"""Config loading: every bad-config case fails early with a message that names what is wrong."""
import textwrap

import pytest

import jaxllm
from jaxllm.config import MeshConfig
from jaxllm.configlib import ConfigError
from jaxllm.parallel.mesh import mesh_shape


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_recipe_loads_preset_and_overrides():
    cfg = jaxllm.load_config("configs/pretrain/tiny.yaml", ["train.steps=7", "model.n_layers=3",
                                                            "optim.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.model.n_layers == 3 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.d_model == 64  # from configs/model/tiny.yaml


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    p = write(tmp_path, """
        model: tiny
        train:
          steps: 5
          batch_sise: 4
    """)
    with pytest.raises(ConfigError) as e:
        jaxllm.load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "line 5" in msg
    assert "train.batch_sise" in msg and "did you mean 'train.batch_size'" in msg


def test_unknown_override_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layer'.*did you mean 'model.n_layers'"):
        jaxllm.load_config(None, ["model.n_layer=3"])


def test_wrong_type_names_key_and_expected_type(tmp_path):
    p = write(tmp_path, "train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"key 'train.steps' expects int, got 'many'"):
        jaxllm.load_config(p)
    with pytest.raises(ConfigError, match=r"key 'train.debug' expects bool"):
        jaxllm.load_config(None, ["train.debug=maybe"])


def test_bad_choice_lists_valid_values():
    with pytest.raises(ConfigError, match=r"model.remat' must be one of .*did you mean 'dots'"):
        jaxllm.load_config(None, ["model.remat=dot"])


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match=r"no model preset 'tiniest'.*available: .*'tiny'"):
        jaxllm.load_config(None, ["model=tiniest"])


def test_invalid_model_geometry_is_explained():
    with pytest.raises(ConfigError, match=r"n_heads \(6\) must be a multiple of model.n_kv_heads \(4\)"):
        jaxllm.load_config(None, ["model.n_heads=6", "model.n_kv_heads=4"])


def test_mesh_that_does_not_fit_says_device_count():
    with pytest.raises(ConfigError, match=r"needs 12 devices but 8 are available"):
        mesh_shape(MeshConfig(data=3, fsdp=2, tensor=2), 8)
    with pytest.raises(ConfigError, match=r"does not fit 8 devices"):
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)


def test_invalid_yaml_names_file(tmp_path):
    p = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        jaxllm.load_config(p)


def test_all_shipped_recipes_and_presets_load():
    import pathlib
    for path in sorted(pathlib.Path("configs/model").glob("*.yaml")):
        cfg = jaxllm.load_config(None, [f"model={path.stem}"])
        assert cfg.model.n_layers > 0, path
    from jaxllm.curate import config as curate_config
    from jaxllm.demo import config as demo_config
    recipes = 0
    for path in sorted(pathlib.Path("configs").glob("*/*.yaml")):
        if path.parent.name == "model":
            continue                              # presets, loaded above
        if path.parent.name == "curate" or path.name == "curate.yaml":
            curate_config.load(str(path), [])     # curation configs
        elif path.parent.name == "demo" and path.stem in ("demo", "quick"):
            assert demo_config.load(path.stem == "quick")[1] == str(path.resolve())
        else:
            cfg = jaxllm.load_config(path)        # every training recipe
            assert cfg.train.steps > 0, path
            recipes += 1
    assert recipes >= 13, recipes


def test_rule_overrides_merge_and_typos_are_caught():
    cfg = jaxllm.load_config(None, ["mesh.rules.vocab=[tensor]", "mesh.rules.embed=[]"])
    assert cfg.mesh.rules == {"vocab": ("tensor",), "embed": ()}
    with pytest.raises(ConfigError, match=r"unknown logical axis 'vocabb'; did you mean 'vocab'"):
        jaxllm.load_config(None, ["mesh.rules.vocabb=[tensor]"])
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'tensr'"):
        jaxllm.load_config(None, ["mesh.rules.vocab=[tensr]"])


@pytest.mark.parametrize("override, message", [
    ("train.microbatches=0", "train.microbatches must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("optim.max_nonfinite_skips=0", "optim.max_nonfinite_skips must be >= 1"),
    ("model.attention=cudnn", "cudnn needs model.compute_dtype bfloat16"),
])
def test_out_of_range_values_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        jaxllm.load_config(None, [override])


def test_microbatch_rows_must_split_over_the_batch_axes(tmp_path):
    cfg = jaxllm.load_config(None, ["model=tiny", "train.batch_size=8", "train.microbatches=4",
                                    "mesh.fsdp=8", "train.steps=1", f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"2 rows per microbatch must be divisible by mesh data\*fsdp = 8"):
        jaxllm.train(cfg)


@pytest.mark.parametrize("args,message", [
    (["lora.dropout=0.1"], r"^lora.dropout set but lora is off \(lora.r=0\), so it would be ignored"),
    (["lora.rslora=true", "lora.init=peft"], r"^lora.rslora, lora.init set but lora is off.*drop them"),
    (["adapter.train_embeddings=true"], r"^adapter.train_embeddings set but adapter is off \(adapter.size=0\)"),
    (["adapter.placement=parallel", "adapter.scale=4"], r"^adapter.placement, adapter.scale set but adapter is off"),
    (["lora.r=4", "lora.dropout=0.1", "train.objective=dpo"], r"the dpo objective runs the policy without dropout"),
    (["lora.r=4", "lora.dropout=0.1", "train.objective=grpo"], r"the grpo objective runs the policy without dropout"),
    (["train.sample_prompts=[hi]", "train.objective=dpo"], r"the dpo recipe does not write samples"),
    (["train.sample_prompts=[hi]"], r"needs a tokenizer to encode them: data.kind=synthetic_tokens"),
    (["train.sample_prompts=[hi]", "data.kind=text", "data.sources=[{path: a.jsonl}]", "train.eval_every=0"],
     r"train.eval_every=0 turns evaluation off"),
])
def test_options_that_would_be_ignored_are_refused(args, message):
    """A delta's options while that delta is off, LoRA dropout under an objective that does not
    apply it, or sample prompts where none are written would change nothing: refused in one
    line, never accepted without a word."""
    with pytest.raises(ConfigError, match=message):
        jaxllm.load_config(None, args)
    jaxllm.load_config(None, ["lora.r=4", "lora.dropout=0.1", "lora.rslora=true"])     # used: fine
    jaxllm.load_config(None, ["adapter.size=8", "adapter.train_embeddings=true"])


def test_a_list_override_that_is_not_valid_yaml_is_refused_not_taken_as_one_string():
    with pytest.raises(ConfigError, match=r"override 'train.sample_prompts=\[What is 2 \+ 3\?\]': the value is "
                                          r"not valid YAML.*quote items"):
        jaxllm.load_config(None, ["train.sample_prompts=[What is 2 + 3?]"])
    cfg = jaxllm.load_config(None, ["train.sample_prompts=['What is 2 + 3?', hi]", "data.kind=text",
                                    "data.sources=[{path: a.jsonl}]"])
    assert cfg.train.sample_prompts == ("What is 2 + 3?", "hi")
