"""The command-line contract (supervisor/options.py, supervisor/resolve.py parsing)."""

import pytest
from agentpen.supervisor.errors import UsageError
from agentpen.supervisor.options import help_text, parse_args
from agentpen.supervisor.resolve import parse_publish, parse_upstream


def test_first_non_option_word_starts_the_command_and_the_rest_passes_untouched():
    o = parse_args(["--allow", "a.example.com", "claude", "--resume", "--allow", "x", "--", "-h"])
    assert o.command == ["claude", "--resume", "--allow", "x", "--", "-h"]
    assert o.allow == ["a.example.com"]


def test_double_dash_separates():
    assert parse_args(["--", "sh", "-c", "echo hi"]).command == ["sh", "-c", "echo hi"]
    assert parse_args(["--", "--weird-name"]).command == ["--weird-name"]


def test_defaults():
    o = parse_args(["claude"])
    assert o.profile == "untrusted" and o.audit_failure == "deny" and o.log_format is None


@pytest.mark.parametrize(
    "argv",
    [[], ["--profile", "lenient", "x"], ["--log-format", "xml", "x"], ["--audit-fd", "-1", "x"],
     ["--json", "x"], ["--nonsense", "x"], ["--allo", "a.example", "x"]],
)
def test_bad_input_is_a_usage_error_not_an_exit(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_help_has_examples_and_exit_statuses():
    text = help_text()
    assert "agentpen claude" in text and "--upstream" in text and "127" in text


@pytest.mark.parametrize(
    "spec, want",
    [("llm.corp=10.0.0.5:443", ("llm.corp", "10.0.0.5", 443)),
     ("h.example=[::1]:8443", ("h.example", "::1", 8443))],
)
def test_upstream_parsing(spec, want):
    assert parse_upstream(spec) == want


@pytest.mark.parametrize(
    "spec", ["nohost", "=1.2.3.4:1", "h=1.2.3.4", "h=1.2.3.4:0", "h=1.2.3.4:70000",
             "h=example.com:443", "h=::1:443", "h=999.1.1.1:443"],
)
def test_bad_upstream_is_refused(spec):
    with pytest.raises(UsageError):
        parse_upstream(spec)


def test_publish_parsing():
    assert parse_publish("8080").host_port == 8080
    p = parse_publish("8080:3000")
    assert (p.host_port, p.sandbox_port) == (8080, 3000)
    with pytest.raises(UsageError):
        parse_publish("80:x")
