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


ARGV_CASES = [
    ["--allow", "a.example", "--allow=b.example", "--env", "FOO", "claude", "--allow", "x"],
    ["--profile", "paranoid", "--allow", "a", "--mount", "/x", "--mount-rw", "/y", "--", "-c"],
    ["--log-level", "debug", "--allow", "a", "--audit-fd", "3", "--upstream", "h=1.2.3.4:443", "sh"],
    ["--allow", "a", "--learn", "--allow", "b", "--check"],
    ["--allow=", "x"],  # an empty value: argparse's verdict, kept
    ["--env", "A", "--env", "B", "--", "sh", "--env", "C"],
]


@pytest.mark.parametrize("argv", ARGV_CASES)
def test_repeatable_options_taken_out_before_argparse_parse_the_same(argv):
    """split_repeated (argparse is quadratic in the number of options) must not change
    what any command line means: same result as argparse alone."""

    from agentpen.supervisor import options

    fast = parse_args(argv)
    plain = options.build_parser().parse_args(argv)
    for dest in ("allow", "env", "mount", "mount_rw", "upstream", "profile", "log_level", "learn"):
        if hasattr(plain, dest):
            assert getattr(fast, dest) == getattr(plain, dest), dest
    cmd = plain.command[1:] if plain.command[:1] == ["--"] else plain.command
    assert fast.command == cmd


@pytest.mark.parametrize("argv", [["--allow"], ["--allow", "--learn", "x"], ["--env"]])
def test_repeatable_option_without_a_value_is_still_a_usage_error(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_ten_thousand_allow_flags_parse_to_the_same_list_in_order():
    names = [f"h{i}.example.com" for i in range(10_000)]
    argv = [t for n in names for t in ("--allow", n)] + ["true"]
    o = parse_args(argv)
    assert o.allow == names and o.command == ["true"] and "allow" in o.explicit
