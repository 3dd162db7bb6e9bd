"""nft ruleset text and read-back verification (pure), against a real nft 1.0.6 listing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from agentpen.core.policy import Publish, SessionPolicy
from agentpen.workers.netns.errors import NetnsSetupError
from agentpen.workers.netns.nftables import load_and_verify, ruleset_text, verify_ruleset

# `nft -j list ruleset` after loading ruleset_text(POLICY) in a pasta namespace.
LISTING = json.loads((Path(__file__).parent / "data" / "netns_nft_listing.json").read_text())


def policy(**kw) -> SessionPolicy:
    return SessionPolicy(session_id="s", profile="untrusted", agent=None, project="/p",
                         command=["/bin/true"], command_name="true", allow=[], **kw)


POLICY = policy(publish=[Publish(8080, 3000)], host_ports=[5432])


def items(listing: dict, kind: str) -> list[dict]:
    return [i[kind] for i in listing["nftables"] if kind in i]


def test_text_shape():
    text = ruleset_text(POLICY)
    assert text.startswith("flush ruleset\ntable inet agentpen {")
    for hook in ("input", "output", "forward"):
        assert f"type filter hook {hook} priority filter; policy drop;" in text
    assert 'iifname "lo" accept' in text and 'oifname "lo" accept' in text
    # every rule line carries a comment saying why
    rule_lines = [ln for ln in text.splitlines() if ln.strip().endswith('"')]
    assert len(rule_lines) == 5 and all(" comment " in ln for ln in rule_lines)
    assert "publish 3000" in text and "host-port 5432" in text


def test_comment_fits_nft_limit():
    many = policy(publish=[Publish(10000 + i, 20000 + i) for i in range(50)],
                  host_ports=list(range(30000, 30050)))
    for line in ruleset_text(many).splitlines():
        if " comment " in line:
            assert len(line.split(" comment ", 1)[1].encode()) - 2 <= 128


def test_real_listing_verifies():
    assert verify_ruleset(LISTING, POLICY) == []


def test_counters_with_traffic_still_verify():
    listing = copy.deepcopy(LISTING)
    for rule in items(listing, "rule"):
        for expr in rule["expr"]:
            if "counter" in expr:
                expr["counter"] = {"packets": 7, "bytes": 420}
    assert verify_ruleset(listing, POLICY) == []


def mutate(fn) -> list[str]:
    listing = copy.deepcopy(LISTING)
    fn(listing)
    return verify_ruleset(listing, POLICY)


def test_policy_accept_is_caught():
    def f(listing):
        items(listing, "chain")[1]["policy"] = "accept"
    assert any("policy" in p for p in mutate(f))


def test_extra_accept_rule_is_caught():
    def f(listing):
        listing["nftables"].append({"rule": {
            "family": "inet", "table": "agentpen", "chain": "output", "handle": 99,
            "expr": [{"accept": None}]}})
    assert any("output" in p for p in mutate(f))


def test_missing_rule_is_caught():
    def f(listing):
        listing["nftables"] = [i for i in listing["nftables"]
                               if not ("rule" in i and i["rule"]["chain"] == "input")]
    assert any("input" in p for p in mutate(f))


def test_changed_match_is_caught():
    def f(listing):
        items(listing, "rule")[0]["expr"][0]["match"]["right"] = "eth0"
    assert mutate(f)


def test_other_table_is_caught():
    def f(listing):
        listing["nftables"].append({"table": {"family": "ip", "name": "nat", "handle": 2}})
        listing["nftables"].append({"chain": {"family": "ip", "table": "nat", "name": "pre",
                                              "handle": 1}})
    problems = mutate(f)
    assert any("exactly table" in p for p in problems)
    assert any("outside table" in p for p in problems)


def test_missing_chain_and_garbage():
    def f(listing):
        listing["nftables"] = [i for i in listing["nftables"]
                               if not ("chain" in i and i["chain"]["name"] == "forward")]
    assert any("forward missing" in p for p in mutate(f))
    assert verify_ruleset({}, POLICY)
    assert verify_ruleset({"nftables": "x"}, POLICY)


def test_listing_for_other_policy_differs():
    # the doors are in the comments: a listing made for other doors does not verify
    assert verify_ruleset(LISTING, policy())


def test_missing_nft_fails_closed():
    with pytest.raises(NetnsSetupError) as exc:
        load_and_verify(POLICY, nft_path="/nonexistent/nft")
    assert "nftables" in exc.value.how_to_fix


def test_missing_library_fails_closed_or_falls_back_to_the_command(monkeypatch):
    from agentpen.workers.netns import nftables

    monkeypatch.setattr(nftables, "LIBRARY", "libnftables-absent.so.99")
    with pytest.raises(NetnsSetupError) as exc:  # asked for the library: no silent fallback
        load_and_verify(POLICY, backend="library")
    assert "libnftables-absent.so.99" in exc.value.what
    with pytest.raises(NetnsSetupError) as exc:  # the default: the nft command is tried
        load_and_verify(POLICY, nft_path="/nonexistent/nft")
    assert "nft not found" in exc.value.what


def test_a_library_without_the_nftables_api_is_refused_as_unusable():
    from agentpen.workers.netns.nftables import Library

    with pytest.raises(OSError, match="lacks"):
        Library("libc.so.6")  # loads, but is not libnftables
