#!/usr/bin/env bash
# The main job on the embedded default: set up, generate the synthetic corpus (no download),
# train its sentencepiece tokenizer, then pretrain the tiny model on CPU (a few minutes).
# Extra arguments are config overrides, e.g. `bash launch/demo.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
J=.venv/bin/jaxllm
if [ ! -f data/synth/tokenizer/tokenizer.model ]; then
  $J data synth --out data/synth
  $J tokenizer train --input 'data/synth/pretrain/train-*.jsonl' --vocab-size 512 --out data/synth/tokenizer
fi
$J demo configs/pretrain/tiny.yaml "$@"
