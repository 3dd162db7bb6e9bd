"""Attack probe, run INSIDE the sandbox (and on the host as the positive control).

Stdlib only (it runs under /usr/bin/python3 in the jail). Reads a JSON list of checks
from the file named by argv[1], runs each, and prints one line `PROBE {json}` mapping
each check's name to its result: {"ok": bool, "errno": int|None, "error": str, ...}.
The tests decide what a result means; the probe only reports what happened.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


def _err(exc: BaseException) -> dict:
    no = getattr(exc, "errno", None)
    return {"ok": False, "errno": no, "error": f"{type(exc).__name__}: {exc}"}


def op_read(path: str, **_: object) -> dict:
    with open(path, "rb") as f:
        return {"ok": True, "data": f.read(4096).decode(errors="replace")}


def op_write(path: str, data: str = "pwned\n", append: bool = False, **_: object) -> dict:
    with open(path, "a" if append else "w") as f:
        f.write(data)
    return {"ok": True}


def op_mkdir(path: str, **_: object) -> dict:
    os.makedirs(path, exist_ok=True)
    return {"ok": True}


def op_rename(src: str, dst: str, **_: object) -> dict:
    os.rename(src, dst)
    return {"ok": True}


def op_listdir(path: str, **_: object) -> dict:
    return {"ok": True, "entries": sorted(os.listdir(path))}


def op_environ_scan(needles: list[str], **_: object) -> dict:
    """Every readable /proc/*/environ and cmdline, and our own env: where do needles occur?"""
    hits: list[str] = []
    read = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for what in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    blob = f.read().decode(errors="replace")
            except OSError:
                continue
            read += 1
            hits += [f"{pid}/{what}:{n}" for n in needles if n in blob]
    env = "\n".join(f"{k}={v}" for k, v in os.environ.items())
    hits += [f"env:{n}" for n in needles if n in env]
    return {"ok": True, "hits": hits, "files_read": read, "env": dict(os.environ)}


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def op_fd_scan(**_: object) -> dict:
    """Every open descriptor of every process we can see: pid -> {fd: target}."""
    me = str(os.getpid())
    out: dict[str, dict[str, str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fds: dict[str, str] = {}
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in names:
            try:
                fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
        out["self" if pid == me else pid] = fds
    return {"ok": True, "fds": out}


def op_status_scan(**_: object) -> dict:
    """Seccomp, no_new_privs and capabilities of every visible process, and whether its
    memory can be opened for writing (same uid: /proc/PID/mem)."""
    out: dict[str, dict] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                st = dict(x.split(":\t", 1) for x in f.read().splitlines() if ":\t" in x)
        except OSError:
            continue
        try:
            os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR))
            mem_rw = True
        except OSError:
            mem_rw = False
        out[pid] = {k: st.get(k, "").strip() for k in ("Name", "Seccomp", "NoNewPrivs", "CapEff", "CapBnd")}
        out[pid]["mem_rw"] = mem_rw
    return {"ok": True, "procs": out}


def op_tcp(host: str, port: int, timeout: float = 3.0, send: str = "", **_: object) -> dict:
    t0 = time.monotonic()
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        got = b""
        if send:
            s.sendall(send.encode())
            got = s.recv(4096)
        return {"ok": True, "reply": got.decode(errors="replace"), "secs": time.monotonic() - t0}
    finally:
        s.close()


def op_udp(host: str, port: int, payload: str = "ping", timeout: float = 1.0, payload_hex: str = "",
           **_: object) -> dict:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(bytes.fromhex(payload_hex) if payload_hex else payload.encode(), (host, port))
        try:
            data, _addr = s.recvfrom(4096)
        except TimeoutError:
            return {"ok": False, "errno": None, "error": "sent, no reply", "sent": True}
        return {"ok": True, "reply": data.decode(errors="replace"), "sent": True}
    finally:
        s.close()


def op_unix(path: str, abstract: bool = False, send: str = "", **_: object) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(("\0" + path) if abstract else path)
        got = b""
        if send:
            s.sendall(send.encode())
            got = s.recv(4096)
        return {"ok": True, "reply": got.decode(errors="replace")}
    finally:
        s.close()


def op_socket(family: str, type: str, proto: int = 0, **_: object) -> dict:
    s = socket.socket(getattr(socket, family), getattr(socket, type), proto)
    s.close()
    return {"ok": True}


def op_icmp_echo(host: str, raw: bool = False, **_: object) -> dict:
    """ICMP echo through a ping socket (SOCK_DGRAM) or a raw socket."""
    v6 = ":" in host
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    kind = socket.SOCK_RAW if raw else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind, proto)
    s.settimeout(2)
    try:
        typ = 128 if v6 else 8
        hdr = struct.pack("!BBHHH", typ, 0, 0, 0x1234, 1) + b"agentpen"
        s.sendto(hdr, (host, 0))
        try:
            s.recvfrom(2048)
        except TimeoutError:
            return {"ok": False, "errno": None, "error": "sent, no reply", "sent": True}
        return {"ok": True, "sent": True}
    finally:
        s.close()


def op_bind_device_connect(dev: str, host: str, port: int, **_: object) -> dict:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        s.connect((host, port))
        return {"ok": True}
    finally:
        s.close()


def op_syscall(nr: int, args: list[int | str] | None = None, **_: object) -> dict:
    """A raw syscall; string arguments are passed as pointers to NUL-terminated bytes."""
    cargs = [ctypes.c_char_p(a.encode()) if isinstance(a, str) else ctypes.c_long(a) for a in (args or [])]
    ctypes.set_errno(0)
    ret = LIBC.syscall(ctypes.c_long(nr), *cargs)
    no = ctypes.get_errno() if ret == -1 else 0
    return {"ok": ret != -1, "ret": ret, "errno": no, "error": errno.errorcode.get(no, "")}


def op_ioctl(fd: int, request: int, arg: str = "", **_: object) -> dict:
    buf = ctypes.create_string_buffer(arg.encode() or b"\0" * 8)
    ctypes.set_errno(0)
    LIBC.ioctl.restype = ctypes.c_int
    LIBC.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    ret = LIBC.ioctl(fd, request, buf)
    no = ctypes.get_errno() if ret == -1 else 0
    return {"ok": ret != -1, "errno": no, "error": errno.errorcode.get(no, "")}


def op_setns(path: str = "/proc/self/ns/net", **_: object) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        return op_syscall(308, [fd, 0])
    finally:
        os.close(fd)


def op_kill(pid: int, sig: int = 0, **_: object) -> dict:
    os.kill(pid, sig)
    return {"ok": True}


def op_ptrace_child(**_: object) -> dict:
    """PTRACE_ATTACH to our own child (allowed under Yama scope 1 and without Yama)."""
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        r = op_syscall(101, [16, child.pid, 0, 0])  # ptrace(PTRACE_ATTACH, pid)
        if r["ok"]:
            os.waitpid(child.pid, 0)
        return r
    finally:
        child.kill()
        child.wait()


def op_process_vm_readv_child(**_: object) -> dict:
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        buf = ctypes.create_string_buffer(8)

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 8)
        remote = IoVec(ctypes.c_void_p(0x10000), 8)  # unmapped: EFAULT if the call is allowed
        ctypes.set_errno(0)
        ret = LIBC.syscall(ctypes.c_long(310), ctypes.c_long(child.pid), ctypes.byref(local),
                           ctypes.c_long(1), ctypes.byref(remote), ctypes.c_long(1), ctypes.c_long(0))
        no = ctypes.get_errno() if ret == -1 else 0
        return {"ok": ret != -1, "errno": no, "error": errno.errorcode.get(no, "")}
    finally:
        child.kill()
        child.wait()


def op_run(argv: list[str], timeout: float = 20, **_: object) -> dict:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return {"ok": p.returncode == 0, "rc": p.returncode, "out": p.stdout[-2000:], "err": p.stderr[-2000:]}


def op_getaddrinfo(host: str, **_: object) -> dict:
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc), "secs": time.monotonic() - t0}
    return {"ok": True, "addrs": sorted({i[4][0] for i in infos}), "secs": time.monotonic() - t0}


def _dns_query(qname: str, qtype: int) -> bytes:
    q = struct.pack("!HHHHHH", 0x4150, 0x0100, 1, 0, 0, 0)
    for label in qname.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", qtype, 1)


def op_dns(server: str, qname: str, qtype: int = 1, port: int = 53, tcp: bool = False,
           **_: object) -> dict:
    q = _dns_query(qname, qtype)
    t0 = time.monotonic()
    if tcp:
        s = socket.create_connection((server, port), timeout=2)
        try:
            s.sendall(struct.pack("!H", len(q)) + q)
            data = s.recv(4096)[2:]
        finally:
            s.close()
    else:
        s = socket.socket(_family(server), socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(q, (server, port))
            data, _addr = s.recvfrom(4096)
        finally:
            s.close()
    _id, flags, _qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    return {"ok": True, "rcode": flags & 0xF, "answers": an, "secs": time.monotonic() - t0}


def op_netcounters(**_: object) -> dict:
    """Packet counters of this network namespace (/proc/net is per netns)."""
    devs: dict[str, dict[str, int]] = {}
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, rest = line.split(":", 1)
            v = [int(x) for x in rest.split()]
            devs[name.strip()] = {"rx_packets": v[1], "tx_packets": v[9]}
    snmp: dict[str, int] = {}
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto = head.split(":")[0]
        for k, v in zip(head.split()[1:], vals.split()[1:], strict=False):
            snmp[f"{proto}.{k}"] = int(v)
    return {"ok": True, "devs": devs, "snmp": snmp}


def op_tls_hello(host: str, port: int, hello_hex: str, chunk: int = 0, wait: float = 8,
                 **_: object) -> dict:
    """Send a hand-made ClientHello (in `chunk`-byte writes; 0 = at once), then read
    what comes back: the proxy's access_denied alert (21, desc 49), or whatever the
    upstream answers once the proxy let the hello through."""
    hello = bytes.fromhex(hello_hex)
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local_port = s.getsockname()[1]
    try:
        if chunk:
            for i in range(0, len(hello), chunk):
                s.sendall(hello[i : i + chunk])
        else:
            s.sendall(hello)
        got = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
            if len(got) >= 7:
                break
    finally:
        s.close()
    alert = got[:1] == b"\x15" and len(got) >= 7
    return {"ok": True, "local_port": local_port, "first": got[:16].hex(), "len": len(got),
            "alert_desc": got[6] if alert else None}


OPS = {k[3:]: v for k, v in globals().items() if k.startswith("op_")}


def main() -> None:
    with open(sys.argv[1]) as f:
        checks = json.load(f)
    out: dict[str, dict] = {}
    for c in checks:
        name = c.pop("name")
        op = OPS[c.pop("op")]
        try:
            out[name] = op(**c)
        except Exception as exc:  # report, never stop: one probe's failure is data
            out[name] = _err(exc)
    sys.stdout.write("PROBE " + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
