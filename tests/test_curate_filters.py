"""Per-filter tests: hand-made documents on both sides of every threshold."""
import dataclasses
import socket
from collections import Counter

import pytest

from jaxllm.curate import heuristics as H
from jaxllm.curate import text as T
from jaxllm.curate.config import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    PiiConfig,
    UrlConfig,
)
from jaxllm.curate.pii import scrub
from jaxllm.curate.url import UrlFilter

GQ = GopherQualityConfig()


def words_doc(n, filler="word", stop=("the", "and")):
    return " ".join(list(stop) + [filler] * (n - len(stop)))


# --- text ---------------------------------------------------------------------------------

def test_regex_tokenizer_keeps_inner_punctuation_and_drops_symbols():
    assert T.words("Don't e-mail 3.14 # ... the U.S. — ok!") == ["Don't", "e-mail", "3.14", "the", "U.S", "ok"]


def test_normalize_strips_case_punctuation_accents_and_layout():
    assert T.normalize("  Héllo,\n\nWORLD!!  café ") == T.normalize("hello world cafe")


# --- URL ----------------------------------------------------------------------------------

def test_url_domain_blocklist_covers_subdomains_but_not_lookalikes(tmp_path):
    f = tmp_path / "domains.txt"
    f.write_text("# comment\nbad-site.com\n")
    u = UrlFilter(UrlConfig(blocklist_files=(str(f),)))
    assert u.reason("https://bad-site.com/page") == "domain"
    assert u.reason("http://www.news.bad-site.com/x") == "domain"
    assert u.reason("https://notbad-site.com/page") is None
    assert u.reason("https://pornhub.com/") == "domain"           # built-in default
    assert u.reason(None) is None


def test_url_banned_words_match_tokens_soft_words_need_threshold(tmp_path):
    for name, text in {"words": "casino\n", "soft": "hot\ngirls\n", "sub": "xvideos\n"}.items():
        (tmp_path / f"{name}.txt").write_text(text)
    u = UrlFilter(UrlConfig(use_default_lists=False, banned_word_files=(str(tmp_path / "words.txt"),),
                            soft_word_files=(str(tmp_path / "soft.txt"),),
                            banned_subword_files=(str(tmp_path / "sub.txt"),)))
    assert u.reason("https://example.org/best-casino-games") == "banned_word"
    assert u.reason("https://example.org/casinos-history") is None  # token, not substring
    assert u.reason("https://example.org/hot-weather") is None        # one soft word
    assert u.reason("https://example.org/hot-girls") == "soft_words"  # two soft words
    assert u.reason("https://example.org/myxvideosclips") == "banned_subword"
    assert UrlFilter(UrlConfig(use_default_lists=False)).reason("https://pornhub.com/") is None


def test_url_compound_tokens_split_only_into_listed_words():
    u = UrlFilter(UrlConfig())
    assert u.reason("https://luckyslots.example/") == "compound"
    assert u.reason("https://royalvegascasino.example/") == "compound"
    assert u.reason("https://online-poker-rooms.example/") == "compound"   # one hyphenated label
    assert u.reason("https://example.org/online-poker-rooms") is None      # path words stay apart
    for whole in ("therapist", "essex", "sussex", "analytics", "scunthorpe", "penisland", "cocktail"):
        assert u.reason(f"https://{whole}.example/") is None, whole


# --- language -----------------------------------------------------------------------------

def test_language_keeps_english_rejects_german_and_low_scores():
    from jaxllm.curate.language import LanguageFilter
    lf = LanguageFilter(LanguageConfig(languages=("en",), threshold=0.65))
    lang, score = lf.predict("The quick brown fox jumps over the lazy dog, and then it runs "
                             "back to the farm where it lives with the other animals.")
    assert lang == "en" and lf.reason(lang, score) is None
    lang, score = lf.predict("Der schnelle braune Fuchs springt über den faulen Hund und läuft "
                             "dann zurück auf den Bauernhof.")
    assert lang == "de" and lf.reason(lang, score) == "other_language"
    assert lf.reason("en", 0.649) == "low_score"
    assert lf.reason("en", 0.65) is None
    assert LanguageFilter(LanguageConfig(languages=())).reason("de", 0.9) is None


def test_language_model_loads_and_predicts_without_network(monkeypatch):
    from jaxllm.curate.language import LanguageFilter

    def no_network(*a, **k):
        raise AssertionError("language ID tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    lf = LanguageFilter(LanguageConfig())
    lf._detector._models.clear()          # force a fresh model load under the patch
    assert lf.predict("This is a plain English sentence about the weather today.")[0] == "en"


# --- Gopher quality -----------------------------------------------------------------------

def test_gopher_word_count_bounds():
    assert H.gopher_quality(words_doc(49), GQ) == "short_doc"
    assert H.gopher_quality(words_doc(50), GQ) is None
    cfg = dataclasses.replace(GQ, max_doc_words=100)
    assert H.gopher_quality(words_doc(100), cfg) is None
    assert H.gopher_quality(words_doc(101), cfg) == "long_doc"


def test_gopher_mean_word_length_bounds():
    cfg = dataclasses.replace(GQ, min_stop_words=0)
    assert H.gopher_quality(words_doc(60, "ab", ()), cfg) == "below_avg_word_length"
    assert H.gopher_quality(words_doc(60, "abc", ()), cfg) is None           # mean 3.0
    assert H.gopher_quality(words_doc(60, "a" * 10, ()), cfg) is None        # mean 10.0
    assert H.gopher_quality(words_doc(60, "a" * 11, ()), cfg) == "above_avg_word_length"


def test_gopher_hash_and_ellipsis_per_word():
    base = words_doc(100)
    assert H.gopher_quality(base + " #" * 10, GQ) is None                     # 0.10
    assert H.gopher_quality(base + " #" * 11, GQ) == "too_many_hashes"        # 0.11
    base99 = words_doc(99)
    assert H.gopher_quality(base99 + " ..." * 5 + " …" * 5 + " end", GQ) is None   # 10 / 100
    assert H.gopher_quality(base99 + " ..." * 11 + " end", GQ) == "too_many_ellipsis"


def test_gopher_bullet_and_ellipsis_lines():
    line = "the and word word word word word word"
    nine = "\n".join(["• " + line] * 9 + [line])
    assert H.gopher_quality(nine, GQ) is None                                 # 90% bullets
    assert H.gopher_quality("\n".join(["• " + line] * 10), GQ) == "too_many_bullets"
    # datatrove counts lines starting with "•" or "-".
    assert H.gopher_quality("\n".join(["- " + line] * 9 + [line]), GQ) is None
    assert H.gopher_quality("\n".join(["- " + line] * 5 + ["  • " + line] * 5), GQ) == "too_many_bullets"
    ends = lambda k: "\n".join([line + " word..."] * k + [line + "."] * (10 - k))  # noqa: E731
    assert H.gopher_quality(ends(3), GQ) is None                               # 30%
    assert H.gopher_quality(ends(4), GQ) == "too_many_end_ellipsis"


def test_gopher_alphabetic_words_and_stop_words():
    assert H.gopher_quality(" ".join(["the", "and"] + ["word"] * 78 + ["1234"] * 20), GQ) is None
    assert H.gopher_quality(" ".join(["the", "and"] + ["word"] * 77 + ["1234"] * 21),
                            GQ) == "below_alpha_threshold"
    # datatrove: occurrences, case-sensitive.
    assert H.gopher_quality(words_doc(60, stop=("the", "The")), GQ) == "few_stop_words"
    assert H.gopher_quality(words_doc(60, stop=("the", "The", "the")), GQ) is None
    assert H.gopher_quality(words_doc(60, stop=("The", "WITH")), GQ) == "few_stop_words"
    # Optional Gopher-paper rule: distinct, case-insensitive.
    gd = dataclasses.replace(GQ, distinct_stop_words=True)
    assert H.gopher_quality(words_doc(60, stop=("the", "The", "the")), gd) == "few_stop_words"
    assert H.gopher_quality(words_doc(60, stop=("The", "WITH")), gd) is None   # 2 distinct


# --- Gopher repetition --------------------------------------------------------------------

def only(**keep):
    off = dict(dup_line_frac=1.0, dup_para_frac=1.0, dup_line_char_frac=1.0,
               dup_para_char_frac=1.0, top_n_grams=(), dup_n_grams=())
    off.update(keep)
    return dataclasses.replace(GopherRepetitionConfig(), **off)


def uniq(i, n=6):
    return " ".join(f"w{i}x{j}" for j in range(n))


def test_duplicate_paragraph_and_line_fractions():
    paras = lambda d: "\n\n".join([uniq(i) for i in range(10 - d)] + [uniq(0)] * d)  # noqa: E731
    assert H.gopher_repetition(paras(3), only(dup_para_frac=0.3)) is None
    assert H.gopher_repetition(paras(4), only(dup_para_frac=0.3)) == "dup_para_frac"
    lines = lambda d: "\n".join([uniq(i) for i in range(10 - d)] + [uniq(0)] * d)  # noqa: E731
    assert H.gopher_repetition(lines(3), only(dup_line_frac=0.3)) is None
    assert H.gopher_repetition(lines(4), only(dup_line_frac=0.3)) == "dup_line_frac"
    # Blank lines between paragraphs are not duplicate content.
    assert H.gopher_repetition(paras(0), only(dup_line_frac=0.3)) is None


def test_duplicate_character_fractions():
    for sep, key, reason in (("\n\n", "dup_para_char_frac", "dup_para_char_frac"),
                             ("\n", "dup_line_char_frac", "dup_line_char_frac")):
        for n_unique in (3, 4, 5, 6):
            text = sep.join([uniq(0)] * 2 + [uniq(i) for i in range(1, n_unique)])
            frac = len(uniq(0)) / len(text)                                # one repeat
            got = H.gopher_repetition(text, only(**{key: 0.2}))
            assert got == (reason if frac > 0.2 else None), (n_unique, frac)
        assert len(uniq(0)) / len(sep.join([uniq(0)] * 2 + [uniq(i) for i in range(1, 6)])) < 0.2
        assert len(uniq(0)) / len(sep.join([uniq(0)] * 2 + [uniq(i) for i in range(1, 3)])) > 0.2


def test_top_ngram_character_fraction():
    sides = set()
    for k in range(1, 12):
        text = " ".join(["aa bb"] * k + [f"u{i:03d}" for i in range(40)])
        frac = len("aa bb") * k / len(text)
        got = H.gopher_repetition(text, only(top_n_grams=((2, 0.2),)))
        assert got == ("top_2_gram" if frac > 0.2 else None)
        sides.add(frac > 0.2)
    assert sides == {True, False}


def test_duplicated_ngram_character_fraction():
    block = "b01 b02 b03 b04 b05"
    sides = set()
    for n_fill in range(10, 40, 3):
        fill = [f"f{i:02d}" for i in range(n_fill)]
        text = " ".join([block] + fill[: n_fill // 2] + [block] + fill[n_fill // 2:])
        # the second copy, counted once, as "".join (no spaces: datatrove's find_all_duplicate)
        frac = len(block.replace(" ", "")) / len(text)
        got = H.gopher_repetition(text, only(dup_n_grams=((5, 0.15),)))
        assert got == ("duplicated_5_n_grams" if frac > 0.15 else None), frac
        sides.add(frac > 0.15)
    assert sides == {True, False}
    # 15 / 115 < 0.15 < 19 / 115: passes only when the joining spaces are not counted.
    fill = [f"f{i:02d}" for i in range(19)]
    text = " ".join([block] + fill[:9] + [block] + fill[9:])
    assert len(text) == 115
    assert H.gopher_repetition(text, only(dup_n_grams=((5, 0.15),))) is None


# --- C4 -----------------------------------------------------------------------------------

C4 = C4Config()
SENT = "This line has enough words to stay."


def test_c4_sentence_minimum_and_line_rules():
    assert H.c4_lines("\n".join([SENT] * 5), C4) == ("\n".join([SENT] * 5), None)
    assert H.c4_lines("\n".join([SENT] * 4), C4) == (None, "too_few_sentences")
    counts = Counter()
    text = "\n".join([SENT] * 5 + ["Two words", "Enable javascript to see this page.",
                                   "We use cookies and a privacy policy here.", "x" * 1001 + " a b"])
    kept, reason = H.c4_lines(text, C4, counts)
    assert reason is None and kept == "\n".join([SENT] * 5)
    assert counts == {"line_too_few_words": 1, "line_javascript": 1, "line_policy": 1,
                      "line_too_long_word": 1}


def test_c4_document_rules_and_options():
    assert H.c4_lines("\n".join([SENT] * 5 + ["Lorem ipsum dolor sit amet."]), C4) == (None, "lorem_ipsum")
    assert H.c4_lines("\n".join([SENT] * 5 + ["function f() { return 1; }"]), C4) == (None, "curly_bracket")
    strict = dataclasses.replace(C4, filter_no_terminal_punct=True)
    kept, _ = H.c4_lines("\n".join([SENT] * 5 + ["No final stop here at all", "Trailing dots..."]), strict)
    assert kept == "\n".join([SENT] * 5)
    kept, _ = H.c4_lines("\n".join(["Cited fact here[1] and more[edit] words."] * 5), C4)
    assert "[1]" not in kept and "[edit]" not in kept


# --- FineWeb ------------------------------------------------------------------------------

FW = FineWebConfig()
LONG = "alpha beta gamma delta epsilon zeta eta theta"   # 8 words, 47 characters


def fw_lines(n, end=lambda i: "."):
    return "\n".join(f"{LONG} {i:03d}{end(i)}" for i in range(n))


def test_fineweb_line_punctuation_ratio():
    assert H.fineweb_quality(fw_lines(25, lambda i: "." if i < 4 else ""), FW) is None      # 0.16
    assert H.fineweb_quality(fw_lines(25, lambda i: "." if i < 3 else ""), FW) == "line_punct_ratio"  # 0.12


def test_fineweb_short_line_ratio():
    short = lambda k: "\n".join([f"Short line {i}." for i in range(k)] + [f"{LONG} {i}." for i in range(100 - k)])  # noqa: E731
    assert H.fineweb_quality(short(66), FW) is None
    assert H.fineweb_quality(short(67), FW) == "short_line_ratio"


def test_fineweb_duplicate_character_ratio():
    for n in (40, 60, 120, 150):
        text = fw_lines(n) + "\n" + f"{LONG} 000."
        frac = len(f"{LONG} 000.") / (len(text) - text.count("\n"))
        assert H.fineweb_quality(text, FW) == ("char_dup_ratio" if frac >= 0.01 else None), frac
    assert len(f"{LONG} 000.") / len(fw_lines(40)) > 0.01 > len(f"{LONG} 000.") / len(fw_lines(150))


def test_fineweb_newline_per_word_ratio():
    three = "\n".join(f"Alphabetical betamaxes gammarays{i:03d}." for i in range(30))  # 29/90
    four = "\n".join(f"Alphabetical betamaxes gammarays deltas{i:03d}." for i in range(30))  # 29/120
    assert H.fineweb_quality(three, FW) == "list_ratio"
    assert H.fineweb_quality(four, FW) is None


# --- PII ----------------------------------------------------------------------------------

def test_pii_replaces_emails_and_ips_but_not_lookalikes():
    cfg = PiiConfig()
    text, n_email, n_ip = scrub("Write to jane.doe+news@mail.example.co.uk or ops@host.org; "
                                "server 192.168.1.20 and 2001:db8:85a3::8a2e:370:7334.", cfg)
    assert (n_email, n_ip) == (2, 2)
    assert "jane" not in text and "192.168" not in text and "2001:db8" not in text
    assert text.count(cfg.email_placeholder) == 2 and text.count(cfg.ip_placeholder) == 2
    same = "Version 1.2.3.4.5, bad 300.1.1.1, time 12:30:45, grammar x ::= y, at @handle."
    assert scrub(same, cfg) == (same, 0, 0)


@pytest.mark.parametrize("thr", [0.12])
def test_fineweb_exclude_zero_option(thr):
    no_punct = fw_lines(10, lambda i: "")
    assert H.fineweb_quality(no_punct, FineWebConfig(line_punct_thr=thr)) == "line_punct_ratio"
    assert H.fineweb_quality(no_punct, FineWebConfig(line_punct_thr=thr, line_punct_exclude_zero=True)) is None
