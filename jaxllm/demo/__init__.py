"""`jaxllm demo`: the whole LLM pipeline on this machine, from a generated crawl to PPO, with a
report that compares the pretrained, SFT and PPO models on the same held-out prompts.

    pipeline.py  the driver: stages in order, skip / redo / resume, seconds per stage
    stages.py    each stage: its command, its outputs, when it is done
    config.py    corpus sizes and per-stage overrides (configs/demo/demo.yaml, quick.yaml)
    crawl.py     the raw crawl-like corpus (curate/synthetic.py plus languages, URLs, PII)
    evaluate.py  held-out prompts answered greedily, scored by the true (programmatic) reward
    report.py    report.md and its figures
"""
