"""DNS host-name validation shared by the ClientHello parser and the allowlist (pure)."""

from __future__ import annotations

import re

MAX_NAME = 253
MAX_LABEL = 63

# LDH label (RFC 1035 / 1123): letters, digits, hyphen; no hyphen at either end.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# A last label that a URL parser or inet_aton would read as a number (WHATWG
# "ends in a number"): decimal or 0x-hex. No TLD looks like this.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")
# The whole name at once, for the common (valid) case: the same label rule, dot-separated.
_LDH_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def canonical_host(name: str) -> str:
    """Lowercase, strip ONE trailing dot, validate as an LDH DNS name.

    Raises ValueError with the precise reason. Only ASCII is accepted here:
    callers that take user input convert IDNA first.
    """
    if name.isascii():  # fast path: one match for a valid name; any doubt takes the long way
        host = name.lower()
        if host.endswith("."):
            host = host[:-1]
        if (len(host) <= MAX_NAME and _LDH_NAME.match(host)
                and not _NUMERIC_LABEL.match(host.rpartition(".")[2])):
            return host
    return _canonical_host_checked(name)


def _canonical_host_checked(name: str) -> str:
    """canonical_host() label by label, raising with the precise reason."""
    if not name:
        raise ValueError("empty name")
    if not name.isascii():
        raise ValueError("non-ASCII character in name")
    if not name.isprintable():
        raise ValueError("control character (NUL, escape...) in name")
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError("name is only a dot")
    if len(host) > MAX_NAME:
        raise ValueError(f"name longer than {MAX_NAME} characters")
    labels = host.split(".")
    for label in labels:
        if not label:
            raise ValueError("empty label (two dots in a row, or a leading dot)")
        if len(label) > MAX_LABEL:
            raise ValueError(f"label longer than {MAX_LABEL} characters")
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r} is not letters, digits and inner hyphens")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise ValueError("numeric last label: an IP address literal, not a DNS name")
    return host
