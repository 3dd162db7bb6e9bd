"""Launching pasta: the argv (pure), feature detection, the spawn, and its stderr.

pasta creates the sandbox's user + network namespace and runs the netns worker in it.
It carries nothing but the explicit opt-in doors: every automatic port forwarding is
off in both directions (its defaults would forward every bound port both ways), the
tap interface gets no address and no route (no ``--config-net``), and its DHCP, NDP,
RA and gateway mapping are switched off where the binary supports switching them off.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from agentpen.core.events import make_event
from agentpen.core.osutil import set_pdeathsig
from agentpen.core.policy import Doors, SessionPolicy
from agentpen.core.record import record
from agentpen.workers.netns import probe
from agentpen.workers.netns.errors import NetnsSetupError

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any

# Long options we need, every one of them, or pasta cannot be made safe (fail closed).
REQUIRED_OPTIONS = frozenset({"--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns", "--quiet",
                              "--foreground"})
# Switched off when the binary has them: services on the tap the sandbox never needs.
OPTIONAL_OFF = ("--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra", "--no-icmp", "--no-udp")

_LONG_OPT = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


@record(frozen=True)
class PastaFeatures:
    """What one pasta binary accepts, as read from its --help."""

    path: str
    version: str
    options: frozenset[str]

    def has(self, option: str) -> bool:
        return option in self.options

    @property
    def map_host_loopback(self) -> bool:
        # 2024+ pasta: --map-host-loopback ADDR (default: the gateway address) makes ADDR
        # reach the host's loopback; --no-map-gw became an alias of "... none".
        return self.has("--map-host-loopback")

    @property
    def map_guest_addr(self) -> bool:
        return self.has("--map-guest-addr")


def parse_help(path: str, help_text: str, version_text: str = "") -> PastaFeatures:
    """Pure: the features of a pasta binary from its --help (and --version) output."""
    options = frozenset(_LONG_OPT.findall(help_text))
    version = ""
    for line in version_text.splitlines():
        if line.startswith(("pasta", "passt")):
            version = line.strip()
            break
    return PastaFeatures(path=path, version=version, options=options)


def check_features(features: PastaFeatures) -> None:
    """Raise unless this pasta can be confined the way agentpen needs."""
    missing = sorted(REQUIRED_OPTIONS - features.options)
    if missing:
        raise NetnsSetupError(
            f"{features.path} lacks options agentpen needs to switch off its automatic "
            f"port forwarding: {', '.join(missing)}",
            "install pasta from the passt package (Debian 12's 2023 build or newer)",
        )
    if not (features.map_host_loopback or features.has("--no-map-gw")):
        raise NetnsSetupError(
            f"{features.path} offers neither --map-host-loopback nor --no-map-gw, so the "
            "gateway address could reach the host's loopback",
            "install pasta from the passt package (Debian 12's 2023 build or newer)",
        )


def pasta_argv(policy: SessionPolicy | Doors, inner_argv: list[str], features: PastaFeatures) -> list[str]:
    """Pure: the full pasta command line that runs ``inner_argv`` in a closed namespace.
    Only the doors and agentpen's own ports are read (``SessionPolicy.doors()``)."""
    check_features(features)
    if not inner_argv:
        raise ValueError("pasta needs a command to run in the namespace")
    argv = [features.path, "--quiet", "--foreground"]
    # No address inside may stand for the host's loopback. --no-map-gw says so in 2023
    # and, as an alias of "--map-host-loopback none", in every later release; it is
    # preferred because one 2024 release dies on "--map-host-loopback none" (its parser
    # lacks a return). --map-guest-addr is left at its documented default, none: with no
    # address and no route inside, nothing can reach either mapping anyway (verified).
    if features.has("--no-map-gw"):
        argv.append("--no-map-gw")
    else:
        argv += ["--map-host-loopback", "none"]
    for opt in OPTIONAL_OFF:
        if features.has(opt):
            argv.append(opt)  # no tap services, no UDP or ICMP handler: no door needs them
    _check_doors(policy)
    tcp_doors = bool(policy.publish or policy.host_ports)
    if not tcp_doors and features.has("--no-tcp"):
        argv.append("--no-tcp")  # no door at all: not even the TCP handler
    # -t: host -> sandbox. Only the opt-in --publish doors, bound on 127.0.0.1 only;
    # without an address pasta binds 0.0.0.0 and :: (the whole network could reach in).
    if policy.publish:
        for pub in policy.publish:
            _check_port(pub.host_port, "publish host port")
            _check_port(pub.sandbox_port, "publish sandbox port")
            argv += ["--tcp-ports", f"127.0.0.1/{pub.host_port}:{pub.sandbox_port}"]
    else:
        argv += ["--tcp-ports", "none"]
    argv += ["--udp-ports", "none"]
    # -T: sandbox -> host. pasta listens on the namespace's 127.0.0.1/::1 PORT and splices
    # to the host's loopback PORT: one service, nothing else on the host.
    if policy.host_ports:
        for port in policy.host_ports:
            _check_port(port, "host port")
            argv += ["--tcp-ns", str(port)]
    else:
        argv += ["--tcp-ns", "none"]
    argv += ["--udp-ns", "none"]
    argv.append("--")
    argv += list(inner_argv)
    return argv


def _check_doors(policy: SessionPolicy | Doors) -> None:
    """A door onto agentpen's own sandbox ports would bypass or break them."""
    own = {policy.proxy_port: "the proxy listener", policy.dns_port: "the DNS responder"}
    for pub in policy.publish:
        if pub.sandbox_port in own:
            raise NetnsSetupError(
                f"--publish {pub.host_port}:{pub.sandbox_port} would expose "
                f"{own[pub.sandbox_port]} to the host",
                "publish the port your own service listens on in the sandbox",
            )
    for port in policy.host_ports:
        if port in own:
            raise NetnsSetupError(
                f"--host-port {port} would take the sandbox port of {own[port]}",
                "reach that host service on another port",
            )


def _check_port(port: Any, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a TCP port (1-65535)")


_feature_cache: dict[tuple[str, int, int], PastaFeatures] = {}


def detect_features(pasta_path: str = "pasta", *, timeout: float = 5.0) -> PastaFeatures:
    """Run ``pasta --help`` once per binary (cached in memory by path, mtime and size)."""
    try:
        resolved, key = probe.resolve(pasta_path)
    except LookupError:
        raise NetnsSetupError(
            f"pasta not found ({pasta_path!r})",
            "install the passt package (apt-get install passt) or give the path to pasta",
        ) from None
    cached = _feature_cache.get(key)
    if cached is not None:
        return cached
    procs = probe.take(key) or probe.start(resolved)
    texts = []
    try:
        for flag, proc, failed in procs:
            try:
                if failed is not None:
                    raise failed
                assert proc is not None
                stdout, stderr = proc.communicate(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise NetnsSetupError(
                        f"could not run {resolved} {flag}: out of file descriptors",
                        "raise the open-file limit (ulimit -n 1024 or more)",
                    ) from exc
                raise NetnsSetupError(
                    f"could not run {resolved} {flag}: {exc}",
                    "check that pasta runs for this user (pasta --help)",
                ) from exc
            if proc.returncode < 0:  # killed: say so, rather than blame missing options
                raise NetnsSetupError(
                    f"{resolved} {flag} was killed by signal {signal.Signals(-proc.returncode).name}",
                    "run agentpen again; if it recurs, check what kills pasta (pasta --help)",
                )
            # 2023 pasta prints its help on stderr, interleaved with syslog noise.
            texts.append("\n".join(
                line for line in (stdout + "\n" + stderr).splitlines()
                if not SYSLOG_NOISE.match(line)
            ))
    finally:
        for _flag, proc, _failed in procs:  # never leave a probe running
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    features = parse_help(resolved, texts[0], texts[1])
    check_features(features)
    _feature_cache[key] = features
    return features


def _pasta_preexec(parent: int, announce: Callable[[], None] | None = None) -> None:
    # Runs in the child between fork and exec: async-signal-safe work only.
    # pasta 2023 refuses to start with SIGPIPE ignored (Python ignores it).
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # A SIGKILLed supervisor must not leave pasta (and its namespace) behind.
    set_pdeathsig(signal.SIGKILL, expected_parent=parent)
    if announce is not None:  # the guardian learns pasta's pid before pasta runs
        announce()


def spawn_pasta(
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    announce: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start pasta: default signal dispositions, empty mask, PDEATHSIG=SIGKILL, its own
    process group (terminal signals are the supervisor's to forward), stderr on a pipe.
    `announce` runs in the child just before exec (supervisor/guardian.py).

    The command pasta runs inherits that stderr pipe too: a worker that must keep the
    user's terminal gets a duplicate of it through ``pass_fds``.
    Note PDEATHSIG follows the *thread* that spawns: call this from a long-lived thread.
    """
    parent = os.getpid()
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            env=dict(env) if env is not None else {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
            close_fds=True,
            restore_signals=True,
            process_group=0,
            preexec_fn=lambda: _pasta_preexec(parent, announce),  # the only hook before exec
        )
    except OSError as exc:
        raise NetnsSetupError(
            f"could not start pasta ({argv[0]}): {exc}",
            "install the passt package or check the path and permissions of pasta",
        ) from exc


# -- pasta's stderr -> events -----------------------------------------------------------

# pasta 2023 tries syslog first and reports every failure on stderr when not on a TTY.
SYSLOG_NOISE = re.compile(r"^Failed to send \d+ bytes to syslog\s*$")
_ERROR_WORDS = re.compile(
    r"\b(fail|failed|error|invalid|cannot|can't|couldn't|unable|refus|exiting|denied)",
    re.IGNORECASE,
)
_WARN_WORDS = re.compile(r"\bwarn", re.IGNORECASE)


class PastaLog:
    """Sans-IO: bytes from pasta's stderr in, event bodies out; nothing raw for a terminal.

    Lines longer than ``max_line`` are cut (and flagged); after ``max_events`` events the
    rest is only counted (``dropped``), so a chatty pasta cannot flood the audit stream.
    """

    def __init__(self, *, max_line: int = 2048, max_events: int = 1000) -> None:
        self.max_line = max_line
        self.max_events = max_events
        self.emitted = 0
        self.dropped = 0
        self.noise = 0
        self._buf = b""
        self._cut = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        events: list[dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:  # a runaway line: emit what we have
                    events += self._line(self._buf[: self.max_line], truncated=True)
                    self._buf = b""
                    self._cut = True
                break
            raw, self._buf = self._buf[:nl], self._buf[nl + 1 :]
            if self._cut:  # the tail of a line already emitted in part
                self._cut = False
                continue
            events += self._line(raw[: self.max_line], truncated=len(raw) > self.max_line)
        return events

    def finish(self) -> list[dict[str, Any]]:
        """pasta's stderr is closed: the last unterminated line, if any."""
        raw, self._buf = self._buf, b""
        if not raw or self._cut:
            return []
        return self._line(raw[: self.max_line], truncated=len(raw) > self.max_line)

    def _line(self, raw: bytes, *, truncated: bool) -> list[dict[str, Any]]:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text).strip()
        if not text:
            return []
        if SYSLOG_NOISE.match(text):
            self.noise += 1
            return []
        if self.emitted >= self.max_events:
            self.dropped += 1
            return []
        self.emitted += 1
        if _ERROR_WORDS.search(text):
            level = "error"
        elif _WARN_WORDS.search(text):
            level = "warning"
        else:
            level = "info"
        return [make_event(
            "pasta-message",
            text,
            level=level,
            category=["network", "process"],
            type=["error"] if level == "error" else ["info"],
            process={"name": "pasta"},
            agentpen={"pasta": {"truncated": truncated}},
        )]

    def summary(self) -> dict[str, Any]:
        """Counts for the audit stream when pasta exits: what was dropped, and why."""
        return make_event(
            "pasta-log-summary",
            f"pasta wrote {self.emitted} messages; {self.dropped} dropped over the cap, "
            f"{self.noise} syslog-failure lines discarded",
            level="debug",
            category=["process"],
            type=["info"],
            process={"name": "pasta"},
            agentpen={"pasta": {"emitted": self.emitted, "dropped": self.dropped,
                                "syslog_noise": self.noise}},
        )
