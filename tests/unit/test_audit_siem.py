"""docs/siem: the Vector and Fluent Bit recipes against a real audit stream.

Neither `vector` nor `fluent-bit` is packaged for Debian 12 or on PyPI, so here the
configs are parsed and their logic replayed on real lines (what each reader does
with a line: split on newline, parse JSON, take the time from @timestamp). When the
binaries are on PATH, the tests at the end run them too.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from agentpen.supervisor.audit import AuditStream, FileSink, default_audit_path

try:  # tests/unit as a package, or as a plain directory on sys.path
    from .test_audit_support import example_events
except ImportError:
    from test_audit_support import example_events

SIEM = Path(__file__).resolve().parents[2] / "docs" / "siem"


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("siem") / "audit.jsonl"
    stream = AuditStream("siem-1", [FileSink(str(path))], chain=True)
    for body in example_events().values():
        stream.emit(body, sender="proxy", pid=7)
    hostile = example_events()["connection-denied"]
    hostile["tls"]["client"]["server_name"] = 'x"\n}{\u2028\x00'
    hostile["message"] = "line one\nline two"
    stream.emit(hostile, sender="proxy", pid=7)
    big = example_events()["session-started"]
    big["process"]["args"] = ["a" * 1000] * 300  # a 300 kB line
    stream.emit(big, sender="supervisor", pid=None)
    stream.close()
    return path


def read_lines_like_a_shipper(path: Path) -> list[bytes]:
    """What Vector's stdin/file sources and Fluent Bit's stdin/tail inputs do: one
    record per newline-terminated line."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


# -- Vector ------------------------------------------------------------------------------


def load_vector() -> dict:
    with open(SIEM / "vector.toml", "rb") as f:
        return tomllib.load(f)


def test_vector_pipeline_is_wired_and_loses_nothing_silently():
    cfg = load_vector()
    sources, transforms, sinks = cfg["sources"], cfg["transforms"], cfg["sinks"]
    names = set(sources) | set(transforms)
    for name, t in transforms.items():
        if t.get("type") == "remap" and t.get("reroute_dropped"):
            names.add(f"{name}.dropped")
    for comp in [*transforms.values(), *sinks.values()]:
        assert comp["inputs"] and set(comp["inputs"]) <= names, comp["inputs"]
    remap = transforms["agentpen_ecs"]
    assert remap["drop_on_error"] and remap["reroute_dropped"]
    # Every rerouted (unparsable) line reaches every sink.
    for sink in sinks.values():
        assert "agentpen_unparsed" in sink["inputs"] and "agentpen_ecs" in sink["inputs"]
        assert sink["buffer"]["when_full"] == "block"  # back-pressure, not drops


def test_vector_remap_replayed_on_real_lines(stream_file):
    cfg = load_vector()
    program = cfg["transforms"]["agentpen_ecs"]["source"].strip()
    assert program == ". = object!(parse_json!(string!(.message)))"
    limit = cfg["sources"]["agentpen_fd"]["max_length"]
    assert cfg["sources"]["agentpen_files"]["max_line_bytes"] == limit
    seqs = []
    for line in read_lines_like_a_shipper(stream_file):
        assert len(line) <= limit
        event = {"message": line.decode()}  # the stdin source puts the line in .message
        parsed = json.loads(event["message"])  # parse_json!, then object!
        assert isinstance(parsed, dict)
        seqs.append(parsed["event"]["sequence"])
        # Loki label templates resolve on every line.
        for tmpl in cfg["sinks"]["loki"]["labels"].values():
            for path in re.findall(r"\{\{\s*([\w.@]+)\s*\}\}", tmpl):
                value = parsed
                for part in path.split("."):
                    value = value[part]
                assert isinstance(value, str) and "\n" not in value
    assert seqs == list(range(1, len(seqs) + 1))


def test_vector_file_source_globs_the_default_audit_files(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (include,) = load_vector()["sources"]["agentpen_files"]["include"]
    pattern = include.replace("${HOME}", str(tmp_path))
    assert fnmatch.fnmatch(default_audit_path("abc"), pattern)


# -- Fluent Bit --------------------------------------------------------------------------


def parse_classic(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Fluent Bit's classic format: [SECTION] then `Key Value` lines; keys are
    case-insensitive; # starts a comment."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1].upper(), {}))
            continue
        assert raw.startswith((" ", "\t")), f"entry outside an indented section: {raw!r}"
        key, _, value = line.partition(" ")
        sections[-1][1][key.lower()] = value.strip()
    return sections


def fluent_time_format_to_python(fmt: str) -> str:
    # %L is Fluent Bit's fractional seconds; Python's %f takes up to 6 digits.
    return fmt.replace("%L", "%f")


def test_fluent_bit_config_references_resolve():
    conf = parse_classic(SIEM / "fluent-bit.conf")
    service = next(v for k, v in conf if k == "SERVICE")
    parsers_file = SIEM / service["parsers_file"]
    parsers = {v["name"]: v for k, v in parse_classic(parsers_file) if k == "PARSER"}
    inputs = [v for k, v in conf if k == "INPUT"]
    outputs = [v for k, v in conf if k == "OUTPUT"]
    assert {i["name"] for i in inputs} == {"stdin", "tail"}
    for i in inputs:
        assert i["parser"] in parsers and i["tag"] == "agentpen.audit"
    for o in outputs:
        assert fnmatch.fnmatch("agentpen.audit", o["match"])
        assert o["retry_limit"] == "False"  # retry for ever rather than drop
    es = next(o for o in outputs if o["name"] == "es")
    assert es["logstash_format"] == "Off" and es["write_operation"] == "create"


def test_fluent_bit_parser_replayed_on_real_lines(stream_file):
    parsers = {v["name"]: v for k, v in parse_classic(SIEM / "fluent-bit-parsers.conf")
               if k == "PARSER"}
    p = parsers["agentpen_ecs"]
    assert p["format"] == "json" and p["time_keep"] == "On"
    fmt = fluent_time_format_to_python(p["time_format"])
    tail = next(v for k, v in parse_classic(SIEM / "fluent-bit.conf")
                if k == "INPUT" and v["name"] == "tail")
    assert tail["buffer_max_size"] == "64M"  # must hold the longest line
    for line in read_lines_like_a_shipper(stream_file):
        assert len(line) < 64 * 1024 * 1024
        rec = json.loads(line)
        ts = datetime.strptime(rec[p["time_key"]], fmt).replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - ts).total_seconds()) < 3600


# -- the real tools, where installed ---------------------------------------------------


@pytest.mark.skipif(shutil.which("vector") is None, reason="vector is not installed here")
def test_vector_validates_and_parses_the_stream(stream_file, tmp_path):
    env = {**os.environ, "AGENTPEN_VECTOR_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    subprocess.run(["vector", "validate", "--no-environment", str(SIEM / "vector.toml")],
                   check=True, timeout=60, env=env)


@pytest.mark.skipif(shutil.which("fluent-bit") is None, reason="fluent-bit is not installed")
def test_fluent_bit_dry_run(tmp_path):
    env = {**os.environ, "AGENTPEN_FLB_STORAGE": str(tmp_path), "AGENTPEN_AUDIT_DIR": str(tmp_path),
           "ELASTIC_HOST": "localhost", "ELASTIC_USER": "u", "ELASTIC_PASSWORD": "p",
           "LOKI_HOST": "localhost"}
    subprocess.run(["fluent-bit", "--dry-run", "-c", str(SIEM / "fluent-bit.conf")],
                   check=True, timeout=60, env=env)
