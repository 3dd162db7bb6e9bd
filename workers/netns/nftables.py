"""The sandbox namespace's nftables ruleset: defence in depth behind "no route but lo".

Pure parts: ``ruleset_text(policy)`` (what ``nft -f -`` loads) and
``verify_ruleset(listing, policy)`` (compares ``nft -j list ruleset`` with what was
meant). Mechanism: ``load_and_verify(policy)`` runs nft and fails closed: through
libnftables, the library the ``nft`` command is a thin shell around (same parser, same
netlink calls, same JSON), in this process: two runs of the command cost 7-10 ms of the
path to the sandbox's command on two cores, the library ~3 ms (issue 10). The ``nft``
command is the fallback where the library cannot be loaded.

Every door is loopback traffic as seen from inside the namespace: the proxy listeners
(127.0.0.1/::1 :443), the DNS responder (:53), and pasta's doors, which pasta splices
to and from sockets bound on the namespace's loopback (``-t 127.0.0.1/P:S`` connects to
127.0.0.1:S inside; ``-T P`` listens on 127.0.0.1:P and [::1]:P inside). So one accept
on ``lo`` per direction carries them all, and everything else is dropped and counted.
"""

from __future__ import annotations

import ctypes
import json
import subprocess

from agentpen.core.policy import Doors, SessionPolicy
from agentpen.core.record import record
from agentpen.workers.netns.errors import NetnsSetupError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

TABLE = "agentpen"
FAMILY = "inet"  # one table for IPv4 and IPv6


@record(frozen=True)
class Rule:
    iface_key: str | None  # "iifname"/"oifname" matched against "lo"; None: every packet
    verdict: str  # "accept" or "drop"
    comment: str
    counter: bool = False


@record(frozen=True)
class Chain:
    name: str
    hook: str
    rules: tuple[Rule, ...]
    policy: str = "drop"  # anything no rule accepts is dropped


def _door_note(policy: SessionPolicy | Doors) -> str:
    doors = [f"publish {p.sandbox_port}" for p in policy.publish]
    doors += [f"host-port {p}" for p in policy.host_ports]
    return (", doors: " + " ".join(doors)) if doors else ""


def chains(policy: SessionPolicy | Doors) -> tuple[Chain, ...]:
    """Pure: the intended chains, from which both the text and the check derive."""
    # nft comments are capped at 128 bytes; keep the door list short.
    note = _door_note(policy)[:60]
    return (
        Chain("input", "input", (
            Rule("iifname", "accept", f"lo only: proxy {policy.proxy_port}, dns {policy.dns_port}"
                 f"{note}"),
            Rule(None, "drop", "not loopback: no route should bring it; count it", counter=True),
        )),
        Chain("output", "output", (
            Rule("oifname", "accept", f"lo only: proxy {policy.proxy_port}, dns {policy.dns_port}"
                 f"{note}"),
            Rule(None, "drop", "not loopback: the sandbox talks to nothing else", counter=True),
        )),
        Chain("forward", "forward", (
            Rule(None, "drop", "nothing is routed through the sandbox", counter=True),
        )),
    )


def _quote(comment: str) -> str:
    if '"' in comment or "\\" in comment or "\n" in comment:
        raise ValueError(f"nft comment cannot carry {comment!r}")
    return f'"{comment}"'


def ruleset_text(policy: SessionPolicy | Doors) -> str:
    """Pure: the ruleset for ``nft -f -``. Flushes first: the namespace is ours alone."""
    lines = ["flush ruleset", f"table {FAMILY} {TABLE} {{"]
    for chain in chains(policy):
        lines.append(f"  chain {chain.name} {{")
        lines.append(f"    type filter hook {chain.hook} priority filter; policy {chain.policy};")
        for rule in chain.rules:
            match = f'{rule.iface_key} "lo" ' if rule.iface_key else ""
            counter = "counter " if rule.counter else ""
            lines.append(f"    {match}{counter}{rule.verdict} comment {_quote(rule.comment)}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _expected_expr(rule: Rule) -> list[Any]:
    expr: list[Any] = []
    if rule.iface_key:
        expr.append({"match": {"op": "==", "left": {"meta": {"key": rule.iface_key}},
                               "right": "lo"}})
    if rule.counter:
        expr.append({"counter": None})  # values vary; normalised below
    expr.append({rule.verdict: None})
    return expr


def _normalise_expr(expr: Any) -> Any:
    if not isinstance(expr, list):
        return expr
    out = []
    for item in expr:
        if isinstance(item, dict) and "counter" in item:
            out.append({"counter": None})
        else:
            out.append(item)
    return out


def verify_ruleset(listing_json: dict[str, Any], policy: SessionPolicy | Doors) -> list[str]:
    """Pure: problems found comparing ``nft -j list ruleset`` to the intended ruleset.
    An empty list means the kernel holds exactly what was meant, and nothing else."""
    problems: list[str] = []
    items = listing_json.get("nftables") if isinstance(listing_json, dict) else None
    if not isinstance(items, list):
        return ["listing is not nft JSON (no 'nftables' list)"]
    tables: list[tuple[str, str]] = []
    got_chains: dict[str, dict[str, Any]] = {}
    got_rules: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(f"unexpected listing item {item!r:.80}")
            continue
        (kind, body), = item.items()
        if kind == "metainfo":
            continue
        if not isinstance(body, dict):
            problems.append(f"unexpected {kind} body {body!r:.80}")
            continue
        where = (body.get("family"), body.get("table", body.get("name")))
        if kind == "table":
            tables.append((str(body.get("family")), str(body.get("name"))))
            continue
        if where != (FAMILY, TABLE):
            problems.append(f"{kind} outside table {FAMILY} {TABLE}: {body!r:.120}")
            continue
        if kind == "chain":
            got_chains[str(body.get("name"))] = body
        elif kind == "rule":
            got_rules.setdefault(str(body.get("chain")), []).append(body)
        else:  # sets, maps, flowtables, objects: nothing of ours uses them
            problems.append(f"unexpected {kind} in table {TABLE}: {body!r:.120}")
    if tables != [(FAMILY, TABLE)]:
        problems.append(f"expected exactly table {FAMILY} {TABLE}, found {tables}")
    want = chains(policy)
    names = {c.name for c in want}
    for extra in sorted(set(got_chains) - names):
        problems.append(f"unexpected chain {extra}")
    for extra in sorted(set(got_rules) - names):
        problems.append(f"rules in unexpected chain {extra}")
    for chain in want:
        got = got_chains.get(chain.name)
        if got is None:
            problems.append(f"chain {chain.name} missing")
            continue
        for key, value in (("type", "filter"), ("hook", chain.hook), ("prio", 0),
                           ("policy", chain.policy)):
            if got.get(key) != value:
                problems.append(f"chain {chain.name}: {key} is {got.get(key)!r}, not {value!r}")
        rules = got_rules.get(chain.name, [])
        if len(rules) != len(chain.rules):
            problems.append(
                f"chain {chain.name}: {len(rules)} rules, expected {len(chain.rules)}")
            continue
        for i, (have, rule) in enumerate(zip(rules, chain.rules, strict=True)):
            if _normalise_expr(have.get("expr")) != _expected_expr(rule):
                problems.append(f"chain {chain.name} rule {i}: {have.get('expr')!r:.160}")
            if have.get("comment") != rule.comment:
                problems.append(f"chain {chain.name} rule {i}: comment {have.get('comment')!r}")
    return problems


LIBRARY = "libnftables.so.1"
NFT_CTX_OUTPUT_JSON = 1 << 4  # nftables/libnftables.h


class Library:
    """libnftables through ctypes: one context, output and errors buffered (nothing is
    printed), ``run(text)`` as ``nft -f -`` would, ``run(text, json=True)`` as ``nft -j``.
    Raises OSError when the library cannot be loaded."""

    def __init__(self, soname: str | None = None) -> None:
        lib = ctypes.CDLL(soname or LIBRARY, use_errno=True)
        try:
            self._bind(lib)
        except AttributeError as exc:  # a library without the API: not usable, say so
            raise OSError(f"{soname or LIBRARY} lacks {exc}") from None

    def _bind(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype, lib.nft_ctx_new.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
        for name in ("nft_ctx_free", "nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_void_p], ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(self.ctx) or lib.nft_ctx_buffer_error(self.ctx):
            self.close()
            raise OSError("libnftables cannot buffer its output")

    def run(self, text: str, doing: str, *, json: bool = False) -> str:
        flags = self.lib.nft_ctx_output_get_flags(self.ctx)
        want = flags | NFT_CTX_OUTPUT_JSON if json else flags & ~NFT_CTX_OUTPUT_JSON
        self.lib.nft_ctx_output_set_flags(self.ctx, want)
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NetnsSetupError(f"{doing} failed (libnftables): {err.strip()[:300]}", _NFT_FIX)
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


_NFT_FIX = ("nft needs CAP_NET_ADMIN in the sandbox's user namespace: run it in the "
            "namespace pasta created, before capabilities are dropped; the kernel needs "
            "nf_tables (modprobe nf_tables)")


def load_and_verify(policy: SessionPolicy | Doors, nft_path: str = "nft", *,
                    timeout: float = 10.0, backend: str | None = None) -> dict[str, Any]:
    """Load the ruleset in this namespace, read it back, verify it; fail closed.

    ``backend``: "library" (libnftables in this process), "command" (the ``nft``
    command, twice), or None: the library, else the command (an explicit ``nft_path``
    means the command). Returns the verified state for the audit stream."""
    text = ruleset_text(policy)
    lib = None
    if backend == "library" or (backend is None and nft_path == "nft"):
        try:
            lib = Library()
        except OSError as exc:
            if backend == "library":
                raise NetnsSetupError(f"{LIBRARY} cannot be loaded: {exc}",
                                      "install the nftables package (apt-get install nftables)") from exc
    if lib is not None:
        try:
            lib.run(text, "loading the nftables ruleset")
            listing = lib.run("list ruleset", "reading the ruleset back", json=True)
        finally:
            lib.close()
        used = "libnftables"
    else:
        from agentpen.core.which import which

        nft = which(nft_path) or which(nft_path, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if nft is None:
            raise NetnsSetupError(f"nft not found ({nft_path!r})",
                                  "install the nftables package (apt-get install nftables)")
        _run([nft, "-f", "-"], text, timeout, "loading the nftables ruleset")
        listing = _run([nft, "-j", "list", "ruleset"], None, timeout, "reading the ruleset back")
        used = nft
    try:
        parsed = json.loads(listing)
    except json.JSONDecodeError as exc:
        raise NetnsSetupError(f"nft -j list ruleset printed no JSON: {exc}",
                              "check that nft supports JSON output (nftables >= 0.9)") from exc
    problems = verify_ruleset(parsed, policy)
    if problems:
        raise NetnsSetupError(
            "the nftables ruleset read back differs from what was loaded: "
            + "; ".join(problems[:5]),
            "report this as a bug; another process may be changing the namespace's ruleset",
        )
    version = next((i["metainfo"].get("version") for i in parsed["nftables"]
                    if "metainfo" in i), None)
    return {
        "table": f"{FAMILY} {TABLE}",
        "chains": {c.name: {"hook": c.hook, "policy": c.policy, "rules": len(c.rules)}
                   for c in chains(policy)},
        "nft_version": version,
        "loaded_by": used,
        "verified": True,
    }


def _run(argv: list[str], stdin: str | None, timeout: float, doing: str) -> str:
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                             timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsSetupError(f"{doing} failed: {exc}",
                              "check that nft runs (nft --version)") from exc
    if res.returncode != 0:
        raise NetnsSetupError(
            f"{doing} failed (nft exit {res.returncode}): {res.stderr.strip()[:300]}", _NFT_FIX)
    return res.stdout
