"""pasta argv, feature detection and stderr parsing (pure parts)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from agentpen.core.policy import Publish, SessionPolicy
from agentpen.workers.netns import pasta
from agentpen.workers.netns.errors import NetnsSetupError
from agentpen.workers.netns.pasta import PastaLog, parse_help, pasta_argv
from hypothesis import given, settings
from hypothesis import strategies as st

HELP_2023 = (Path(__file__).parent / "data" / "netns_pasta_2023_help.txt").read_text()
# A current pasta: --map-host-loopback/--map-guest-addr exist; --no-map-gw is an alias.
HELP_NEW = HELP_2023 + (
    "  --map-host-loopback ADDR\tTranslate ADDR to refer to host\n"
    "  --map-guest-addr ADDR\tTranslate ADDR to guest's address\n"
)


def policy(**kw) -> SessionPolicy:
    return SessionPolicy(session_id="s", profile="untrusted", agent=None, project="/p",
                         command=["/bin/true"], command_name="true", allow=[], **kw)


def opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


F2023 = parse_help("/usr/bin/pasta", HELP_2023, "pasta 0.0~git20230309\n")
FNEW = parse_help("/usr/bin/pasta", HELP_NEW)


def test_2023_help_is_parsed():
    assert {"--tcp-ports", "--tcp-ns", "--no-map-gw", "--no-dhcp"} <= F2023.options
    assert not F2023.map_host_loopback
    assert F2023.version.startswith("pasta")


def test_default_argv_closes_every_automatic_forward():
    argv = pasta_argv(policy(), ["/bin/worker", "--x"], F2023)
    for opt in ("--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
        assert opt_values(argv, opt) == ["none"], opt
    assert "--no-map-gw" in argv
    assert "--config-net" not in argv
    for opt in ("--quiet", "--foreground", "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
                "--no-udp", "--no-icmp", "--no-tcp"):
        assert opt in argv
    assert argv[argv.index("--") + 1 :] == ["/bin/worker", "--x"]


def test_publish_binds_host_loopback_only():
    argv = pasta_argv(policy(publish=[Publish(8080, 3000), Publish(9000, 9000)]), ["w"], F2023)
    assert opt_values(argv, "--tcp-ports") == ["127.0.0.1/8080:3000", "127.0.0.1/9000:9000"]
    assert "--no-tcp" not in argv
    assert opt_values(argv, "--tcp-ns") == ["none"]
    assert opt_values(argv, "--udp-ports") == ["none"]


def test_host_ports_open_exactly_those_ports():
    argv = pasta_argv(policy(host_ports=[5432]), ["w"], F2023)
    assert opt_values(argv, "--tcp-ns") == ["5432"]
    assert opt_values(argv, "--tcp-ports") == ["none"]
    assert opt_values(argv, "--udp-ns") == ["none"]


def test_new_pasta_keeps_no_map_gw_alias():
    # --no-map-gw is "--map-host-loopback none" in current pasta, and safe in the 2024
    # release whose parser dies on "none"
    argv = pasta_argv(policy(), ["w"], FNEW)
    assert "--no-map-gw" in argv and "--map-host-loopback" not in argv


def test_future_pasta_without_no_map_gw_uses_map_host_loopback_none():
    future = parse_help("/usr/bin/pasta", HELP_NEW.replace("--no-map-gw", "--something"))
    argv = pasta_argv(policy(), ["w"], future)
    assert opt_values(argv, "--map-host-loopback") == ["none"]


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_bad_ports_refused(port):
    with pytest.raises(ValueError):
        pasta_argv(policy(host_ports=[port]), ["w"], F2023)


def test_pasta_without_needed_options_fails_closed():
    old = parse_help("/x/pasta", "  -t, --tcp-ports SPEC\n  -u, --udp-ports SPEC\n")
    with pytest.raises(NetnsSetupError) as exc:
        pasta_argv(policy(), ["w"], old)
    assert "--tcp-ns" in exc.value.what and exc.value.how_to_fix


def test_detect_features_real_binary_is_cached():
    path = "/usr/bin/pasta"
    if not os.path.exists(path):
        pytest.skip("pasta not installed")
    pasta._feature_cache.clear()
    first = pasta.detect_features(path)
    assert first.path == path  # never the passt it links to: argv[0] picks the mode
    assert pasta.detect_features(path) is first
    assert "--tcp-ns" in first.options


def test_detect_features_missing_binary():
    with pytest.raises(NetnsSetupError):
        pasta.detect_features("/nonexistent/pasta")


# -- spawn: signal dispositions, mask, process group, PDEATHSIG ----------------------

# Not a Python probe: Python ignores SIGPIPE itself at start-up. exec keeps the pid.
PROBE = ["/bin/sh", "-c", "exec cat /proc/self/status /proc/self/stat"]


def _probe_state(out: bytes) -> tuple[int, int, bool]:
    text = out.decode()
    st = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    stat = text.splitlines()[-1]
    fields = stat[stat.rindex(")") + 2 :].split()
    pid = int(stat.split()[0])
    return int(st["SigIgn"].strip(), 16), int(st["SigBlk"].strip(), 16), int(fields[2]) == pid


def test_spawn_resets_signals_and_isolates_process_group():
    sigpipe = 1 << (signal.SIGPIPE - 1)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in any Python parent
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        proc = pasta.spawn_pasta(PROBE, stdout=subprocess.PIPE, env=dict(os.environ))
        out, _ = proc.communicate(timeout=30)
        # positive control: a plain child inherits the ignored SIGPIPE and the mask
        plain = subprocess.run(PROBE, capture_output=True, timeout=30,
                               restore_signals=False, check=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    ign, blk, own_group = _probe_state(out)
    assert ign & sigpipe == 0 and blk == 0 and own_group
    ign, blk, own_group = _probe_state(plain.stdout)
    assert ign & sigpipe and blk and not own_group


def test_spawn_sets_pdeathsig():
    code = "import ctypes,sys; l=ctypes.CDLL(None); v=ctypes.c_int(); " \
           "l.prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    proc = pasta.spawn_pasta([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             env=dict(os.environ))
    out, _ = proc.communicate(timeout=30)
    assert int(out) == signal.SIGKILL


# -- PastaLog ----------------------------------------------------------------------------

def test_log_drops_syslog_noise_and_makes_events():
    log = PastaLog()
    events = log.feed(b"Failed to send 69 bytes to syslog\nFailed to bind any port for "
                      b"'-t 127.0.0.1/18081:3000', exiting\nFailed to send 3")
    assert len(events) == 1
    ev = events[0]
    assert ev["action"] == "pasta-message" and ev["level"] == "error"
    assert "18081" in ev["message"] and ev["process"] == {"name": "pasta"}
    assert log.feed(b"5 bytes to syslog\n") == []  # split noise line still recognised
    assert log.noise == 2


def test_log_partial_lines_and_finish():
    log = PastaLog()
    assert log.feed(b"Multiple default IPv4 rout") == []
    assert log.feed(b"es, picked first\npartial") [0]["message"] == \
        "Multiple default IPv4 routes, picked first"
    assert log.finish()[0]["message"] == "partial"


def test_log_is_bounded():
    log = PastaLog(max_line=16, max_events=2)
    events = log.feed(b"A" * 100)  # runaway line: cut and flagged
    assert len(events) == 1 and events[0]["agentpen"]["pasta"]["truncated"]
    assert log.feed(b"AAAA\nsecond\nthird\n")[0]["message"] == "second"
    assert log.dropped == 1
    assert log.summary()["agentpen"]["pasta"]["dropped"] == 1


def test_log_scrubs_control_characters():
    (ev,) = PastaLog().feed(b"warning: odd \x1b[31mred\x07\n")
    assert "\x1b" not in ev["message"] and ev["level"] == "warning"


@pytest.mark.parametrize("pol", [
    policy(publish=[Publish(8443, 443)]),
    policy(publish=[Publish(5353, 53)]),
    policy(host_ports=[443]),
    policy(host_ports=[53]),
])
def test_doors_onto_agentpens_own_ports_refused(pol):
    with pytest.raises(NetnsSetupError):
        pasta_argv(pol, ["w"], F2023)


def test_spawn_missing_binary_fails_closed():
    with pytest.raises(NetnsSetupError):
        pasta.spawn_pasta(["/nonexistent/pasta", "--help"])


_ports = st.integers(1, 65535).filter(lambda p: p not in (53, 443))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_ports, _ports), max_size=4), st.lists(_ports, max_size=4),
       st.booleans())
def test_argv_property_no_door_beyond_the_policy(pubs, host_ports, new):
    pol = policy(publish=[Publish(h, s) for h, s in pubs], host_ports=host_ports)
    argv = pasta_argv(pol, ["/w"], FNEW if new else F2023)
    head = argv[: argv.index("--")]
    assert "--config-net" not in head and "auto" not in head
    tcp = opt_values(head, "--tcp-ports")
    assert tcp == ([f"127.0.0.1/{h}:{s}" for h, s in pubs] or ["none"])
    assert opt_values(head, "--tcp-ns") == ([str(p) for p in host_ports] or ["none"])
    assert opt_values(head, "--udp-ports") == ["none"] == opt_values(head, "--udp-ns")
    # every option that takes a value is one we know: nothing slipped in
    known = {"--tcp-ports", "--tcp-ns", "--udp-ports", "--udp-ns", "--map-host-loopback",
             "--map-guest-addr"}
    takes_value = [a for a, b in itertools.pairwise(head)
                   if a.startswith("-") and not b.startswith("-")]
    assert set(takes_value) <= known


def test_early_probes_are_read_by_detect_features_and_discarded_when_unused(tmp_path):
    from agentpen.workers.netns import probe

    with pytest.raises(LookupError):
        probe.resolve(str(tmp_path / "no-pasta-here"))
    probe.start_early(str(tmp_path / "no-pasta-here"))  # best effort: nothing started, no error
    assert probe._started == {}
    fake = tmp_path / "pasta"
    fake.write_text("#!/bin/sh\necho '  --tcp-ports --udp-ports --tcp-ns --udp-ns --quiet --foreground "
                    "--no-map-gw'\n")
    fake.chmod(0o755)
    probe.start_early(str(fake))
    assert len(probe._started) == 1
    pasta._feature_cache.clear()
    features = pasta.detect_features(str(fake))  # reads the early probes, then caches
    assert features.has("--no-map-gw") and probe._started == {}
    fake.write_text(fake.read_text() + "# changed\n")  # another binary: probed anew
    probe.start_early(str(fake))
    assert len(probe._started) == 1
    probe.discard()  # the run ended before pasta: reaped, none left
    assert probe._started == {}
