"""The resolved session policy: pure data, built once by the supervisor and sent to
the workers over their channel (never on argv or in the environment).

Everything here is already validated and normalised; workers do not second-guess
it, they enforce it.
"""

from __future__ import annotations

from agentpen.core.record import asdict, field, record

TYPE_CHECKING = False  # typing's own flag, without importing typing (issue 10)
if TYPE_CHECKING:
    from typing import Any, Literal

    Profile = Literal["untrusted", "paranoid"]
    MountMode = Literal["ro", "rw"]



@record(frozen=True)
class Mount:
    """A host path made visible inside the sandbox at the same path."""

    path: str
    mode: MountMode = "ro"
    why: str = ""  # short reason, shown by `config show` and in the audit stream
    source: str = ""  # bind this host path at `path` instead (paranoid's private copies)


@record(frozen=True)
class Upstream:
    """`--upstream HOST=ADDR:PORT`: dial ADDR:PORT for HOST instead of resolving it."""

    host: str
    addr: str
    port: int


@record(frozen=True)
class Publish:
    """`--publish PORT[:SANDBOX_PORT]`: host 127.0.0.1:host_port -> sandbox sandbox_port."""

    host_port: int
    sandbox_port: int


@record(frozen=True)
class Doors:
    """What pasta's command line depends on: the opt-in doors and agentpen's own sandbox
    ports (that no door may take). Known from the options before the policy is resolved,
    so that pasta can start first (supervisor/cli.py)."""

    publish: tuple[Publish, ...] = ()
    host_ports: tuple[int, ...] = ()
    proxy_port: int = 443
    dns_port: int = 53


@record(frozen=True)
class SessionPolicy:
    session_id: str
    profile: Profile
    agent: str | None
    project: str  # absolute, real path; the one writable place
    command: list[str]  # argv; argv[0] is the resolved absolute path
    command_name: str  # what the user typed as argv[0]
    allow: list[str]  # normalised names: "api.example.com" or "*.example.com"
    upstreams: list[Upstream] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the complete environment of the jail
    mounts: list[Mount] = field(default_factory=list)  # extra paths (agent config, command install)
    protect: list[str] = field(default_factory=list)  # project-relative paths kept read-only
    unprotect: list[str] = field(default_factory=list)  # built-in protected paths lifted (--unprotect)
    publish: list[Publish] = field(default_factory=list)
    host_ports: list[int] = field(default_factory=list)
    uid: int = 0
    gid: int = 0
    user: str = ""
    home: str = ""
    learn: bool = False
    runtime_paths: list[str] = field(default_factory=list)  # agentpen's own: never mounted
    proxy_port: int = 443
    dns_port: int = 53
    profile_name: str = ""  # what --profile named (a config profile's base is `profile`)
    # paranoid: the throwaway copy bound at `project` (under runtime_paths' sessions/)
    project_source: str = ""
    # resource caps set on the jail before bwrap: {"data": bytes, "nproc": n, "cpu": seconds}
    rlimits: dict[str, int] = field(default_factory=dict)


    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def doors(self) -> Doors:
        return Doors(tuple(self.publish), tuple(self.host_ports), self.proxy_port, self.dns_port)

    def network_view(self) -> tuple[Any, ...]:
        """What the netns worker sets the namespace up from (nft, listeners, DNS, the
        user namespace): the part of the policy that must not change after CONFIG."""
        return (tuple(self.allow), self.learn, self.proxy_port, self.dns_port,
                tuple(self.publish), tuple(self.host_ports), self.uid, self.gid)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionPolicy:
        d = dict(data)
        d["upstreams"] = [Upstream(**u) for u in d.get("upstreams", [])]
        d["mounts"] = [Mount(**m) for m in d.get("mounts", [])]
        d["publish"] = [Publish(**p) for p in d.get("publish", [])]
        return cls(**d)
