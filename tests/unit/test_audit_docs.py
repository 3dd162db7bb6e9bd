"""docs/audit.md and docs/siem/example-audit.jsonl stay true to the code and schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
from agentpen.supervisor.audit import verify_chain

try:  # tests/unit as a package, or as a plain directory on sys.path
    from .test_audit_support import load_schema
except ImportError:
    from test_audit_support import load_schema

DOCS = Path(__file__).resolve().parents[2] / "docs"
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def test_every_example_line_in_the_doc_validates():
    text = (DOCS / "audit.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    lines = [x for b in blocks for x in b.splitlines() if x.strip()]
    assert len(lines) >= 5
    for line in lines:
        VALIDATOR.validate(json.loads(line))


def test_the_example_session_validates_and_verifies():
    path = DOCS / "siem" / "example-audit.jsonl"
    for line in path.read_text().splitlines():
        VALIDATOR.validate(json.loads(line))
    res = verify_chain(str(path))
    assert res.ok and res.chained, res


def test_every_action_the_schema_knows_is_documented():
    text = (DOCS / "audit.md").read_text()
    actions = set()
    for rule in load_schema()["allOf"]:
        try:
            actions.add(rule["if"]["properties"]["event"]["properties"]["action"]["const"])
        except KeyError:
            continue
    assert actions
    for action in actions:
        assert f"`{action}`" in text, action
