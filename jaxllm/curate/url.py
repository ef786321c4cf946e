"""URL filter: domain blocklist and banned-word lists, after datatrove's URLFilter (FineWeb).

datatrove downloads the UT1 adult blocklist at run time; nothing may be downloaded here, so
jaxllm ships its own lists as data (jaxllm/curate/lists/*.txt, used unless
url.use_default_lists=false) and the user adds list files (url.*_files), UT1's among them.
A URL is lower-cased; its tokens are its runs of [a-z0-9]. The checks, datatrove's first:
  domain          the host, a parent domain or the top-level domain is on the blocklist, or a
                  host token is a `name.*` entry (pornhub.* blocks pornhub.es, pornhub-hd.net)
  banned_word     a URL token is a banned word
  soft_words      at least `soft_word_threshold` distinct tokens are soft-banned words
  banned_subword  a banned sub-word occurs in the URL squashed to [a-z0-9]
  compound        (not in datatrove) a token splits completely into listed words, two or
                  more, one of them banned or soft-banned: "freeviagra", "royalvegascasino";
                  a hyphenated host label counts as one token ("online-poker-rooms").
                  Every part must be a listed word, so "therapist" (the + rapist) and
                  "essex" (es + sex) stay whole: "the" and "es" are in no list.
"""
from __future__ import annotations

import pathlib
import re
import urllib.parse

from jaxllm.curate.config import UrlConfig
from jaxllm.errors import UserError

LISTS_DIR = pathlib.Path(__file__).resolve().parent / "lists"
DEFAULT_LISTS = {   # UrlFilter attribute -> shipped file
    "domains": "blocked_domains.txt",
    "banned_words": "banned_words.txt",
    "soft_words": "soft_banned_words.txt",
    "subwords": "banned_subwords.txt",
    "compound_words": "compound_words.txt",
}
MAX_COMPOUND_LEN = 64   # longer tokens are ids and hashes, not names

_SPLIT_RE = re.compile(r"[^a-z0-9]+")
_ALPHA_RE = re.compile(r"[a-z]+")


class ListFileError(UserError):
    """A URL list file is missing or unreadable."""


def load_list(path: str | pathlib.Path) -> set[str]:
    """One entry a line; blank lines and '#' comments are skipped; entries are lower-cased."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ListFileError(f"url filter list file {path} cannot be read ({type(e).__name__}: "
                            f"{getattr(e, 'strerror', None) or e}); fix the path in url.*_files "
                            f"(relative paths are relative to the recipe file)") from None
    out = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            out.add(line)
    return out


def host_of(url: str) -> str:
    url = url.strip().lower()
    try:
        return urllib.parse.urlsplit(url if "//" in url else "//" + url).hostname or ""
    except ValueError:   # "http://[bad" and the like
        return ""


def tokens(text: str) -> set[str]:
    return {t for t in _SPLIT_RE.split(text.lower()) if t}


class UrlFilter:
    """Holds the compiled lists; `reason(url)` is None for a URL that passes."""

    def __init__(self, cfg: UrlConfig):
        def lists(name, files):
            s = load_list(LISTS_DIR / DEFAULT_LISTS[name]) if cfg.use_default_lists else set()
            for f in files:
                s |= load_list(f)
            return s

        domains = {d.lstrip(".").removeprefix("www.") for d in lists("domains", cfg.blocklist_files)}
        self.domain_names = {d[:-2] for d in domains if d.endswith(".*")}
        self.domains = {d for d in domains if not d.endswith(".*")}
        self.banned_words = lists("banned_words", cfg.banned_word_files)
        self.soft_words = lists("soft_words", cfg.soft_word_files)
        self.banned_subwords = lists("subwords", cfg.banned_subword_files)
        self.soft_threshold = cfg.soft_word_threshold
        self._subword_re = (re.compile("|".join(map(re.escape, sorted(self.banned_subwords))))
                            if self.banned_subwords else None)
        self._flagged = self.banned_words | self.soft_words
        self._vocab = self._flagged | (lists("compound_words", ()) if cfg.use_default_lists else set())
        self._max_word = max(map(len, self._vocab), default=0)
        self._splits: dict[str, tuple[str, ...] | None] = {}

    def reason(self, url: str | None) -> str | None:
        if not url:
            return None  # documents without a URL cannot be judged by it
        url_l = url.strip().lower()
        host = host_of(url_l)
        labels = host.split(".")
        # "a.b.bad.com" is blocked by "bad.com", every host under "xxx" by "xxx".
        if any(".".join(labels[i:]) in self.domains for i in range(len(labels))):
            return "domain"
        if self.domain_names.intersection(tokens(host)):   # pornhub.es, bet365-mirror.link
            return "domain"
        toks = tokens(url_l)
        if toks & self.banned_words:
            return "banned_word"
        if len(toks & self.soft_words) >= self.soft_threshold:
            return "soft_words"
        if self._subword_re is not None and self._subword_re.search(_SPLIT_RE.sub("", url_l)):
            return "banned_subword"
        # A host label is one name however it is hyphenated: "online-poker-rooms".
        words = toks | {label.replace("-", "") for label in labels}
        if any(self._is_compound(t) for t in words if len(t) <= MAX_COMPOUND_LEN):
            return "compound"
        return None

    def _is_compound(self, token: str) -> bool:
        """Every letter run of `token` splits into listed words; two or more words in all,
        and one of them banned or soft-banned. Digits separate runs ("casino777")."""
        n_words, flagged = 0, False
        for run in _ALPHA_RE.findall(token):
            split = self._split(run)
            if split is None:
                return False
            n_words += len(split)
            flagged = flagged or any(w in self._flagged for w in split)
        return n_words >= 2 and flagged

    def _split(self, run: str) -> tuple[str, ...] | None:
        """A split of `run` into vocabulary words, preferring one with a flagged word."""
        if run not in self._splits:
            if len(self._splits) > 1 << 16:
                self._splits.clear()
            self._splits[run] = self._split_uncached(run)
        return self._splits[run]

    def _split_uncached(self, run: str) -> tuple[str, ...] | None:
        # best[i]: a split of run[:i], as (has flagged word, words); None if there is none.
        best: list[tuple[bool, tuple[str, ...]] | None] = [None] * (len(run) + 1)
        best[0] = (False, ())
        for end in range(1, len(run) + 1):
            for start in range(max(0, end - self._max_word), end):
                word = run[start:end]
                if best[start] is None or word not in self._vocab:
                    continue
                cand = (best[start][0] or word in self._flagged, best[start][1] + (word,))
                if best[end] is None or cand[0] > best[end][0]:
                    best[end] = cand
        return best[-1][1] if best[-1] is not None else None
