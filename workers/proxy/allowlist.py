"""The egress allowlist (pure policy): exact names and `*.suffix` wildcards, deny by default.

Entry rules (normalize_allow_entry), each refusal with its reason:
- IP literals in any spelling (dotted, 2130706433, 0x7f.1, 0177.0.0.1, v6, [v6]):
  addresses are pinned with --upstream, never allowed by name.
- Loopback / local-only names: localhost and *.localhost, localdomain, local
  (mDNS, RFC 6762), home.arpa (RFC 8375), internal, invalid, onion, arpa.
  They never name a public service; allowing them would only help confusion attacks.
- Single-label names (resolved through search domains, so not one fixed name).
- Wildcards: only a leading `*.` followed by at least two labels (`*.com`, `*`,
  `a.*.com`, `*x.com` are refused). `*.example.com` matches subdomains at any depth,
  not example.com itself.
- IDNA: non-ASCII names are converted with the stdlib `idna` codec, which is
  IDNA 2003 (nameprep), not IDNA 2008/UTS 46: a few names map differently
  (e.g. German sharp s becomes "ss"; some newer code points are refused). When in
  doubt give the xn-- form, which is taken as is.
There is no public-suffix list: `*.co.uk` is accepted; the user is trusted with it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from agentpen.core.digest import sha256
from agentpen.workers.proxy.names import canonical_host

_LOCAL_SUFFIXES = ("localhost", "localdomain", "local", "home.arpa", "internal", "invalid",
                   "onion", "arpa")
_LOCAL_LAST_LABELS = frozenset(s.rpartition(".")[2] for s in _LOCAL_SUFFIXES)
_IPV4_CHARS = frozenset("0123456789.")


def _refuse_ip_literal(text: str) -> None:
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    literal = bare.split("%", 1)[0]
    # ip_address() accepts only dotted decimal (IPv4) or text with a colon (IPv6): asking
    # it about anything else only builds two exceptions (half the cost of a 10,000-name
    # allowlist's normalisation, issue 10).
    if ":" in literal or (literal and _IPV4_CHARS.issuperset(literal)):
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            pass
        else:
            raise ValueError(f"{text!r} is an IP address; pin addresses with --upstream HOST=ADDR:PORT")
    try:
        socket.inet_aton(bare)  # accepts 2130706433, 0x7f.1, 0177.0.0.1 ...
    except (OSError, ValueError):  # ValueError: embedded NUL, judged as a name below
        pass
    else:
        raise ValueError(f"{text!r} is an IPv4 address in a numeric spelling")
    if ":" in text or "[" in text or "]" in text:
        raise ValueError(f"{text!r}: ports, brackets and IPv6 literals are not allowed")


def _to_ascii(name: str) -> str:
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"{name!r} is not a valid internationalised name: {exc}") from None


def normalize_allow_entry(entry: str) -> str:
    """Canonical form of one allowlist entry, or ValueError with the precise reason."""
    text = entry.strip()
    if not text:
        raise ValueError("empty allowlist entry")
    if text == "*":
        raise ValueError("'*' would allow everything; use --learn to observe instead")
    _refuse_ip_literal(text)
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if "*" in rest:
        raise ValueError(f"{entry!r}: only a leading '*.' wildcard is supported")
    try:
        host = canonical_host(_to_ascii(rest))
    except ValueError as exc:
        raise ValueError(f"{entry!r} is not a valid DNS name: {exc}") from None
    labels = host.split(".")
    if labels[-1] in _LOCAL_LAST_LABELS:  # else no local suffix can match
        for suffix in _LOCAL_SUFFIXES:
            if host == suffix or host.endswith("." + suffix):
                raise ValueError(
                    f"{entry!r} is a local-only name (.{suffix}); it never names a public service"
                )
    if wildcard and len(labels) < 2:
        raise ValueError(f"{entry!r}: a wildcard needs at least two labels after '*.' (no '*.com')")
    if not wildcard and len(labels) < 2:
        raise ValueError(f"{entry!r}: single-label names are resolved through search domains")
    return "*." + host if wildcard else host


class Allowlist:
    """Exact set plus wildcard-suffix set; match() walks the name's suffixes (O(labels))."""

    def __init__(self, entries: Iterable[str]) -> None:
        canon = {normalize_allow_entry(e) for e in entries}
        self._exact = frozenset(e for e in canon if not e.startswith("*."))
        self._suffixes = frozenset(e[2:] for e in canon if e.startswith("*."))
        self.entries: tuple[str, ...] = tuple(sorted(canon))

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, host: str) -> str | None:
        """The rule that allows `host` ("a.b" or "*.b"), or None (denied)."""
        try:
            name = canonical_host(host)
        except ValueError:
            return None
        return self.match_canonical(name)

    def match_canonical(self, name: str) -> str | None:
        """`match` for a name already through canonical_host (the ClientHello parser's
        server_name is): the proxy's per-connection path skips validating it twice."""
        if name in self._exact:
            return name
        dot = name.find(".")
        while dot != -1:  # strictly shorter suffixes only: *.x.y never matches x.y
            suffix = name[dot + 1 :]
            if suffix in self._suffixes:
                return "*." + suffix
            dot = name.find(".", dot + 1)
        return None

    def digest(self) -> str:
        """sha256 hex of the canonical entries, sorted, one per line ("\\n"-joined)."""
        return sha256("\n".join(self.entries).encode()).hexdigest()
