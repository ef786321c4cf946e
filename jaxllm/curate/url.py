"""URL filter: domain blocklist and banned-word patterns, after datatrove's URLFilter.

datatrove downloads the UT1 adult blocklist at run time; nothing may be downloaded here, so
the user passes list files (config `url.*_files`) and a small built-in default covers the
obvious cases. The four checks, in datatrove's order:
  domain       the host or any parent domain is on the blocklist
  banned_word  a URL token (split on non-alphanumerics) is a banned word
  soft_words   at least `soft_word_threshold` distinct soft-banned tokens
  banned_subword  a banned sub-word occurs in the URL squashed to [a-z0-9]
"""
from __future__ import annotations

import pathlib
import re
import urllib.parse

from jaxllm.curate.config import UrlConfig

DEFAULT_BLOCKED_DOMAINS = ("pornhub.com", "xvideos.com", "xnxx.com", "xhamster.com", "redtube.com")
DEFAULT_BANNED_WORDS = ("porn", "porno", "xxx", "hentai", "nsfw", "xvideos", "camgirls")
DEFAULT_BANNED_SUBWORDS = ("pornhub", "xvideos", "xhamster")
DEFAULT_SOFT_WORDS = ("sex", "adult", "nude", "naked", "cam", "milf", "escort", "hot", "girls")

_SPLIT_RE = re.compile(r"[^a-z0-9]+")


def load_list(path: str) -> set[str]:
    """One entry a line; blank lines and '#' comments are skipped; entries are lower-cased."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"url filter list file not found: {path}")
    out = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.add(line)
    return out


class UrlFilter:
    """Holds the compiled lists; `reason(url)` is None for a URL that passes."""

    def __init__(self, cfg: UrlConfig):
        def lists(files, default):
            s = set(default) if cfg.use_default_lists else set()
            for f in files:
                s |= load_list(f)
            return s

        self.domains = {d.lstrip(".").removeprefix("www.") for d in
                        lists(cfg.blocklist_files, DEFAULT_BLOCKED_DOMAINS)}
        self.banned_words = lists(cfg.banned_word_files, DEFAULT_BANNED_WORDS)
        self.banned_subwords = tuple(sorted(lists(cfg.banned_subword_files, DEFAULT_BANNED_SUBWORDS)))
        self.soft_words = lists(cfg.soft_word_files, DEFAULT_SOFT_WORDS)
        self.soft_threshold = cfg.soft_word_threshold

    def reason(self, url: str | None) -> str | None:
        if not url:
            return None  # documents without a URL cannot be judged by it
        url_l = url.strip().lower()
        host = urllib.parse.urlsplit(url_l if "//" in url_l else "//" + url_l).hostname or ""
        parts = host.split(".")
        # "a.b.bad.com" is blocked by "bad.com": check every suffix with at least two labels.
        if any(".".join(parts[i:]) in self.domains for i in range(max(len(parts) - 1, 1))):
            return "domain"
        tokens = set(t for t in _SPLIT_RE.split(url_l) if t)
        if tokens & self.banned_words:
            return "banned_word"
        if len(tokens & self.soft_words) >= self.soft_threshold:
            return "soft_words"
        squashed = _SPLIT_RE.sub("", url_l)
        if any(w in squashed for w in self.banned_subwords):
            return "banned_subword"
        return None
