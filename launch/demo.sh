#!/usr/bin/env bash
# The whole pipeline on this machine, nothing downloaded: set up, then `jaxllm demo`, which
# generates a raw crawl and the synthetic corpora, curates, trains the tokenizer, pretrains
# the tiny model, SFTs it (LoRA; --full-sft for every parameter), trains a reward model, runs
# PPO and writes runs/demo/report.md comparing the pretrained, SFT and PPO models.
# Arguments go to `jaxllm demo`: --quick (tiny budgets), --out DIR, --force, --full-sft.
# A killed demo resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/jaxllm demo "$@"
