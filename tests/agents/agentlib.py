"""Real agents under agentpen (issue 8). Shared table and helpers.

The agents are the real published packages, installed the way users install them in the
home of the user running the tests (tests/agents/install-agents.sh; `.ci/run` calls it).
They are found on that user's PATH, so these tests run with the user's real $HOME, like
`agentpen claude` would: agentpen mounts an install under $HOME and the agent's registry
config paths into the jail and nothing else of the home (checked here with canaries).

A missing agent is a failure, never a skip; the message says how to install it.
Nothing waits by sleeping: every wait is on a process or a descriptor, with a deadline.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]
HOME = pwd.getpwuid(os.getuid()).pw_dir
INSTALL_HINT = ("install the real agents for this user: as root `tests/agents/install-agents.sh "
                "$USER`, or as the user `bash tests/agents/install-agents.sh $USER`; then put the "
                "PATH line it adds to ~/.profile into this shell")
DUMMY = "sk-agentpen-test-dummy-key-0000000000000000"


@dataclass(frozen=True)
class Agent:
    name: str                      # registry name
    command: str                   # what the user types
    version_re: str                # --version output
    package: str                   # npm package or PyPI project
    headless: tuple[str, ...]      # a one-shot prompt
    env: dict[str, str]            # dummy key and knobs (passed through by the registry)
    api_host: str                  # the TLS host the prompt must reach
    error_re: str                  # the agent's own error, in its output
    headless_flags: tuple[str, ...] = ()   # agentpen options for the headless run
    tui_quit: tuple[bytes, ...] = (b"\x03", b"\x03")  # keys that end the TUI
    tui_env: dict[str, str] = field(default_factory=dict)
    workaround_flags: tuple[str, ...] = ()  # agentpen options working around a finding
    exit_zero_on_error: bool = False  # the agent reports an API failure with exit status 0
    redraw_fits: bool = True  # after a resize its new frame fits the new width
    # False: the agent retries forever without network (checked outside agentpen too); the
    # test then stops it and expects agentpen to end the session cleanly.
    gives_up_offline: bool = True


AGENTS: dict[str, Agent] = {a.name: a for a in (
    Agent("claude", "claude", r"^(\d+\.\d+\.\d+) \(Claude Code\)", "@anthropic-ai/claude-code",
          ("-p", "hi"), {"ANTHROPIC_API_KEY": DUMMY, "CLAUDE_CODE_MAX_RETRIES": "1"},
          "api.anthropic.com", r"API Error|Connection|ECONNRESET"),
    Agent("codex", "codex", r"^codex-cli (\d+\.\d+\.\d+)", "@openai/codex",
          ("exec", "hi"), {"OPENAI_API_KEY": DUMMY},
          "api.openai.com", r"Reconnecting|stream disconnected",
          # codex 0.171.0 `exec` retries once a minute forever ("Reconnecting... waiting for
          # network"), on a host without network too: it never gives up by itself.
          gives_up_offline=False),
    Agent("gemini", "gemini", r"^(\d+\.\d+\.\d+)$", "@google/gemini-cli",
          ("--skip-trust", "-p", "hi"), {"GEMINI_API_KEY": DUMMY},
          "generativelanguage.googleapis.com", r"fetch failed|Error"),
    Agent("qwen", "qwen", r"^(\d+\.\d+\.\d+)$", "@qwen-code/qwen-code",
          ("--auth-type", "openai", "-p", "hi"), {"OPENAI_API_KEY": DUMMY},
          "dashscope.aliyuncs.com", r"[Ee]rror|Connection",
          # qwen 0.24.4 clears and repaints on a resize, but boxes holding a long unbreakable
          # line (its ripgrep warning's path) stay wider than the terminal
          redraw_fits=False),
    Agent("opencode", "opencode", r"^(\d+\.\d+\.\d+)$", "opencode-ai",
          ("run", "hi"), {"ANTHROPIC_API_KEY": DUMMY},
          # In a git repository opencode writes .opencode/.gitignore at start: a missing
          # .opencode/ is a private scratch (docs/jail.md), so no workaround flag.
          "api.anthropic.com", r"Error"),
    Agent("aider", "aider", r"^aider (\d+\.\d+\.\d+)", "aider-chat",
          ("--message", "hi", "--yes", "--no-check-update", "--no-show-release-notes",
           "--model", "gpt-4o"),
          {"OPENAI_API_KEY": DUMMY},
          "api.openai.com", r"Connection\s+error|APIConnectionError",
          exit_zero_on_error=True),  # aider --message prints the error and exits 0
)}


def agent_params():
    return [pytest.param(a, id=a.name) for a in AGENTS.values()]


@functools.cache
def user_path() -> str:
    """PATH as the user's login shell sets it (~/.profile: where nvm, npm's prefix and pipx
    add their bin directories), then this process's own entries."""
    current = os.environ.get("PATH", "/usr/bin:/bin").split(":")
    env = {"HOME": HOME, "PATH": "/usr/bin:/bin", "USER": pwd.getpwuid(os.getuid()).pw_name}
    try:
        login = subprocess.run(["bash", "--login", "-c", 'printf %s "$PATH"'], capture_output=True,
                               text=True, timeout=20, stdin=subprocess.DEVNULL, env=env).stdout.split(":")
    except (OSError, subprocess.TimeoutExpired):
        login = []
    out: list[str] = []
    for d in [*login, *current]:
        if d and d not in out:
            out.append(d)
    return ":".join(out)


def locate(agent: Agent) -> Path:
    """The agent as the user's PATH finds it; a failure (not a skip) when missing."""
    found = shutil.which(agent.command, path=user_path())
    if found is None:
        pytest.fail(f"{agent.command} ({agent.package}) is not on PATH={user_path()}: {INSTALL_HINT}")
    return Path(found)


def agentpen_env(tmp: Path, agent: Agent | None = None, **extra: str) -> dict[str, str]:
    env = {
        "HOME": HOME,
        "PATH": user_path(),
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        "XDG_STATE_HOME": str(tmp / "state"),  # audit and agentpen state out of the home
        "SECRET_HOST_TOKEN": "host-secret-do-not-leak",
    }
    if agent is not None:
        env.update(agent.env)
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    audit_path: Path
    seconds: float
    timed_out: bool = False  # the test stopped it (SIGTERM to agentpen at the deadline)

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def events(self, action: str) -> list[dict]:
        return [e for e in self.audit() if e["event"]["action"] == action]

    def session(self) -> dict:
        started = self.events("session-started")
        assert started, f"no session-started in {self.audit_path}"
        return started[0]


def make_project(root: Path) -> Path:
    """A small git repository (codex and aider expect one), no identity in .git/config."""
    project = root / "project"
    project.mkdir(parents=True)
    (project / "hello.py").write_text("print('hello')\n")
    for cmd in (["git", "init", "-q", "-b", "main"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "add", "."],
                ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True, timeout=30)
    return project


def start(args: list[str], *, project: Path, env: dict[str, str], audit: Path, **kw) -> subprocess.Popen:
    argv = [*AGENTPEN, "--log-format", "json", "--audit-log", str(audit), *args]
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, cwd=project, env=env, text=True, **kw)


def run(args: list[str], *, project: Path, env: dict[str, str], audit: Path, timeout: float) -> Result:
    t0 = time.monotonic()
    p = start(args, project=project, env=env, audit=audit)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # agentpen forwards it and ends the session
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=30)
        return Result(p.returncode, out, err + f"\n[test] stopped after {timeout} s", audit,
                      time.monotonic() - t0, timed_out=True)
    return Result(p.returncode, out, err, audit, time.monotonic() - t0)


def agent_output(text: str) -> str:
    """The command's own stderr: agentpen's JSON log lines removed."""
    return "\n".join(line for line in text.splitlines() if not line.startswith('{"@timestamp"'))


# -- a real pseudo-terminal ------------------------------------------------------------------

class Pty:
    """agentpen on a new pseudo-terminal (its controlling terminal), read from the master."""

    def __init__(self, args: list[str], *, project: Path, env: dict[str, str], audit: Path,
                 rows: int = 40, cols: int = 120):
        import fcntl
        import pty
        import struct
        import termios

        self._fcntl, self._struct, self._termios = fcntl, struct, termios
        self.master, slave = pty.openpty()
        self.resize(rows, cols)
        argv = [*AGENTPEN, "--log-format", "json", "--audit-log", str(audit), *args]

        def ctty() -> None:  # new session; the pty slave becomes the controlling terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, cwd=project, env=env, stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, preexec_fn=ctty)
        os.close(slave)
        self.buf = bytearray()

    def resize(self, rows: int, cols: int) -> None:
        self._fcntl.ioctl(self.master, self._termios.TIOCSWINSZ,
                          self._struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(self, pred, timeout: float) -> bool:
        """Read the master until pred(bytes read so far) holds or the deadline passes."""
        deadline = time.monotonic() + timeout
        while not pred(bytes(self.buf)):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.master], [], [], left)
            if not r:
                return False
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every slave closed (the session ended)
                return pred(bytes(self.buf))
            if not chunk:
                return pred(bytes(self.buf))
            self._feed(chunk)
        return True

    def read_quiet(self, quiet: float, limit: float) -> None:
        """Read until the agent has written nothing for `quiet` seconds (its screen settled),
        at most `limit` seconds."""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.master], [], [], min(quiet, left))
            if not r:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        """Keep the output; answer cursor position queries (DSR, ESC [ 6 n) the way a real
        terminal does: crossterm-based TUIs (codex) wait for the answer before redrawing."""
        self.buf += chunk
        for _ in range(chunk.count(b"\x1b[6n")):
            os.write(self.master, b"\x1b[1;1R")

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int | None:
        """Drain the master while waiting for agentpen to exit (a full pty would block it)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
            if r:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if chunk:
                    self._feed(chunk)
                else:
                    break
        try:
            return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        os.close(self.master)


def frame_width(raw: bytes) -> int:
    """The widest run of text in terminal output, cursor moves taken as line breaks."""
    import unicodedata

    raw = re.sub(rb"\x1b\[\d*(;\d*)?[Hf]|\x1b\[\d*[ABEFd]", b"\n", raw)
    widths = [sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
                  for c in line) for line in re.split(r"[\r\n]", text_of(raw))]
    return max(widths, default=0)


def text_of(raw: bytes) -> str:
    """Printable text of terminal output: escape sequences removed."""
    s = raw.decode("utf-8", "replace")
    s = re.sub(r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)", "", s)      # OSC
    s = re.sub(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]", "", s)        # CSI
    s = re.sub(r"\x1b[PX^_][^\x1b]*\x1b\\", "", s)           # DCS etc.
    s = re.sub(r"\x1b[@-Z\\-_]|\x1b.", "", s)
    return s
