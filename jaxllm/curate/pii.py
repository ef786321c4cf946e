"""PII scrubbing: e-mail addresses and IP addresses become fixed placeholders.

As in FineWeb (datatrove's PIIFormatter), the text keeps its shape: an address is replaced,
not the sentence around it. IPv4 candidates are validated octet by octet, so "1.2.3.999" or
a version string with five parts is left alone; IPv6 candidates are validated by `ipaddress` and need three
non-empty groups (a bare "::" is valid IPv6 but is BNF far more often than an address).
"""
from __future__ import annotations

import ipaddress
import re

from jaxllm.curate.config import PiiConfig

EMAIL_RE = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d]|\.\d)")
_IPV6_CANDIDATE_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def scrub(text: str, cfg: PiiConfig) -> tuple[str, int, int]:
    """Returns (scrubbed text, e-mails replaced, IP addresses replaced)."""
    text, n_email = EMAIL_RE.subn(cfg.email_placeholder, text)
    text, n_ip4 = IPV4_RE.subn(cfg.ip_placeholder, text)
    n_ip6 = 0

    def ip6(m: re.Match) -> str:
        nonlocal n_ip6
        if sum(1 for g in m.group(0).split(":") if g) < 3:
            return m.group(0)   # "::=" in a grammar is a valid address but not PII
        try:
            ipaddress.IPv6Address(m.group(0))
        except ValueError:
            return m.group(0)   # "12:30:45" and the like are not addresses
        n_ip6 += 1
        return cfg.ip_placeholder

    if ":" in text:
        text = _IPV6_CANDIDATE_RE.sub(ip6, text)
    return text, n_email, n_ip4 + n_ip6
