"""Proxy worker: SNI-gated TLS passthrough on uvloop, in the host network namespace."""
