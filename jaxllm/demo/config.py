"""What the demo makes besides its training recipes: corpus sizes, the tokenizer's vocabulary,
the held-out comparison, and per-stage `key=value` overrides of the recipes in configs/demo/.
configs/demo/demo.yaml is the full demo, configs/demo/quick.yaml the `--quick` one."""
from __future__ import annotations

import dataclasses

from jaxllm import configlib
from jaxllm.configlib import REPO_CONFIGS

DEMO_CONFIGS = REPO_CONFIGS / "demo"


@dataclasses.dataclass(frozen=True)
class StageOverrides:
    """Extra `key=value` overrides of each stage's recipe (they appear in its printed command)."""
    curate: tuple[str, ...] = ()
    pretrain: tuple[str, ...] = ()
    sft: tuple[str, ...] = ()
    reward: tuple[str, ...] = ()
    ppo: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    crawl_docs: int = 3000          # raw crawl-like documents to curate
    crawl_shards: int = 4
    synth_train_docs: int = 20_000  # `jaxllm data synth`: pretraining documents; chat, reward
    synth_eval_docs: int = 1_000    # and PPO records are a quarter of these
    synth_shards: int = 4
    vocab_size: int = 512
    eval_prompts: int = 64          # held-out PPO prompts every model answers
    eval_samples: int = 8           # sampled answers per prompt (at PPO's rollout settings) besides greedy
    # the labelling stage (InstructGPT's): the SFT model answers this many PPO training prompts
    # label_k times at PPO's rollout settings, and the synthetic labeler ranks the answers
    label_prompts: int = 1000
    label_k: int = 4
    eval_show: int = 8              # of which the report shows this many side by side
    overrides: StageOverrides = StageOverrides()

    def __post_init__(self):
        for name in ("crawl_docs", "crawl_shards", "synth_train_docs", "synth_eval_docs",
                     "synth_shards", "eval_prompts", "eval_samples", "label_prompts"):
            if getattr(self, name) < 1:
                raise configlib.ConfigError(f"demo config: {name} must be >= 1, got {getattr(self, name)}")
        if self.label_k < 2:
            raise configlib.ConfigError(f"demo config: label_k must be >= 2 (a ranking needs 2 answers), "
                                        f"got {self.label_k}")
        if self.eval_prompts > max(self.synth_eval_docs // 4, 1):
            raise configlib.ConfigError(
                f"demo config: eval_prompts={self.eval_prompts} but only {self.synth_eval_docs // 4} held-out "
                f"PPO prompts are made (synth_eval_docs // 4); raise synth_eval_docs")


def load(quick: bool) -> tuple[DemoConfig, str]:
    path = DEMO_CONFIGS / ("quick.yaml" if quick else "demo.yaml")
    return configlib.load(DemoConfig, path), str(path)
