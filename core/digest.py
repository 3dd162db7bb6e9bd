"""``sha256``: CPython's own SHA-256, without hashlib's OpenSSL load (~3 ms of every
session's start, issue 10, for one digest of the allowlist). Same digests."""

from __future__ import annotations

try:  # CPython 3.12+
    from _sha2 import sha256  # type: ignore[import-not-found]
except ImportError:
    try:  # CPython 3.11
        from _sha256 import sha256  # type: ignore[import-not-found,no-redef]
    except ImportError:  # another implementation: hashlib's
        from hashlib import sha256  # type: ignore[assignment]

__all__ = ["sha256"]
