"""The per-document stages, in FineWeb's order, shared by the local and the Beam runner.

url -> language -> gopher_repetition -> gopher_quality -> c4 (may drop lines) -> fineweb
-> classifier -> PII scrubbing. Dedup keys are computed afterwards in batches
(`keys_for`), on the text that will be written, because dedup needs all documents at once.
"""
from __future__ import annotations

from collections import Counter

from jaxllm.curate import dedup, heuristics
from jaxllm.curate import text as T
from jaxllm.curate.config import CurateConfig
from jaxllm.curate.io import Record
from jaxllm.curate.report import Stats


class Curator:
    """Holds what the stages load once per worker: URL lists, the language model, the
    quality classifier."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.url = None
        self.language = None
        self.classifier = None
        if cfg.url.enabled:
            from jaxllm.curate.url import UrlFilter
            self.url = UrlFilter(cfg.url)
        if cfg.language.enabled:
            from jaxllm.curate.language import LanguageFilter
            self.language = LanguageFilter(cfg.language)
        if cfg.classifier.model_path:
            from jaxllm.curate.classifier import QualityModel
            self.classifier = QualityModel.load(cfg.classifier.model_path)

    def process(self, rec: Record, stats: Stats) -> Record | None:
        """The curated record, or None after counting why it was removed."""
        cfg = self.cfg
        text = rec.text
        ws = T.words(text)   # shared by the stages that read the original text
        stats.observe("words_input", len(ws))

        def removed(stage: str, reason: str | None) -> bool:
            if reason is not None:
                stats.add(f"removed/{stage}/{reason}")
                return True
            return False

        if self.url is not None:
            stats.add("in/url")
            if removed("url", self.url.reason(rec.url)):
                return None
        if self.language is not None:
            stats.add("in/language")
            lang, score = self.language.predict(text)
            stats.observe("language_score", score)
            if removed("language", self.language.reason(lang, score)):
                return None
        if cfg.gopher_repetition.enabled:
            stats.add("in/gopher_repetition")
            if removed("gopher_repetition", heuristics.gopher_repetition(text, cfg.gopher_repetition, ws)):
                return None
        if cfg.gopher_quality.enabled:
            stats.add("in/gopher_quality")
            if removed("gopher_quality", heuristics.gopher_quality(text, cfg.gopher_quality, ws)):
                return None
        if cfg.c4.enabled:
            stats.add("in/c4")
            lines: Counter = Counter()
            new_text, reason = heuristics.c4_lines(text, cfg.c4, lines)
            if removed("c4", reason):
                return None
            for k, v in lines.items():
                stats.add(f"lines/{k}", v)
            text = new_text
        if cfg.fineweb.enabled:
            stats.add("in/fineweb")
            if removed("fineweb", heuristics.fineweb_quality(text, cfg.fineweb)):
                return None
        if self.classifier is not None:
            stats.add("in/classifier")
            score = float(self.classifier.score([text])[0])
            stats.observe("quality_score", score)
            if removed("classifier", "low_score" if score < cfg.classifier.threshold else None):
                return None
        if cfg.pii.enabled:
            from jaxllm.curate.pii import scrub
            text, n_email, n_ip = scrub(text, cfg.pii)
            stats.add("pii/emails", n_email)
            stats.add("pii/ips", n_ip)
        return Record(rec.order, rec.id, text, rec.url)


def keys_for(records: list[Record], cfg: CurateConfig) -> dedup.DedupKeys:
    return dedup.dedup_keys([r.text for r in records], [r.order for r in records], cfg.dedup)
