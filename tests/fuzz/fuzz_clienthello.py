"""atheris harness for the ClientHello parser (docs/fuzzing.md).

Property checked on every input: the parser either returns a ClientHello, returns None
(needs more), or raises ClientHelloError; it never reads past MAX_HANDSHAKE; and
feeding the same bytes split in two gives the same answer as feeding them at once.

    python tests/fuzz/fuzz_clienthello.py -atheris_runs=10000000 corpus/
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from agentpen.workers.proxy.clienthello import (
        MAX_HANDSHAKE,
        ClientHelloError,
        ClientHelloParser,
    )


def _run(chunks: list[bytes]) -> object:
    p = ClientHelloParser()
    try:
        res = None
        for c in chunks:
            res = p.feed(c)
            if res is not None:
                break
        out: object = res
    except ClientHelloError as exc:
        out = ("error", exc.reason)
    if p.consumed > MAX_HANDSHAKE:
        raise AssertionError(f"parser read {p.consumed} bytes, bound is {MAX_HANDSHAKE}")
    return out


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    cut = int.from_bytes(data[:2], "big") % (len(data) - 1) + 2
    body = data[2:]
    whole = _run([body])
    split = _run([body[: cut - 2], body[cut - 2 :]])
    if whole != split:
        raise AssertionError(f"split at {cut - 2} changed the result: {whole!r} vs {split!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
