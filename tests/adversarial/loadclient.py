"""Load client that runs INSIDE the sandbox (stdlib only: the system python3).

Copied into the project by tests/adversarial/test_load.py and bench/load_full.py and
started by agentpen, so every connection takes the full path: sandbox DNS ->
127.0.0.1:443 in the sandbox netns -> proxy worker -> local TLS upstream.

    python3 loadclient.py SCENARIO ARGS_JSON RESULT_PATH

Scenarios (each writes one JSON object to RESULT_PATH and prints it):
  hold   open `n` TLS connections and keep them open; write CTL/held; wait for CTL/go;
         time one fresh request (responsiveness); then one request on every held one.
  churn  `n` short connections (handshake, GET, read, close), `concurrency` at a time.
  slow   `slow` clients trickle a real ClientHello one byte per `interval` s, `silent`
         clients connect and send nothing; while they hang on, `probes` normal
         requests must complete; then wait for the proxy to close every slow client.
  huge   one hand-built ClientHello of `size` bytes (allowed SNI, padding extension,
         split into 16 KiB records), then a normal request.
  fds    open `n` TLS connections at once (more than the proxy's cap), count outcomes,
         close them, then a normal request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import struct
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls:" + (exc.reason or type(exc).__name__)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"oserror:{exc.errno}"
    return type(exc).__name__


class Client:
    def __init__(self, args: dict) -> None:
        self.host = args["host"]
        self.port = int(args.get("port", 443))
        self.ctx = ssl.create_default_context(cafile=args["cafile"])
        self.timeout = float(args.get("timeout", 30))
        self.errors: dict[str, int] = {}

    def err(self, exc: BaseException) -> None:
        k = classify(exc)
        self.errors[k] = self.errors.get(k, 0) + 1

    async def open(self):
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ctx, server_hostname=self.host),
            self.timeout)

    async def request_on(self, reader, writer) -> bool:
        writer.write(REQUEST % self.host.encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), self.timeout)
        writer.close()
        return data.startswith(b"HTTP/1.1 200")

    async def request(self) -> tuple[bool, float]:
        t0 = time.monotonic()
        try:
            r, w = await self.open()
            ok = await self.request_on(r, w)
        except Exception as exc:
            self.err(exc)
            return False, time.monotonic() - t0
        return ok, time.monotonic() - t0


async def wait_file(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def hold(args: dict) -> dict:
    c = Client(args)
    n, ctl = int(args["n"]), args["ctl"]
    gate = asyncio.Semaphore(int(args.get("open_concurrency", 100)))
    held: list = []

    async def one():
        async with gate:
            try:
                held.append(await c.open())
            except Exception as exc:
                c.err(exc)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    opened_s = time.monotonic() - t0
    with open(os.path.join(ctl, "held.tmp"), "w") as f:
        json.dump({"held": len(held)}, f)
    os.rename(os.path.join(ctl, "held.tmp"), os.path.join(ctl, "held"))
    go = await wait_file(os.path.join(ctl, "go"), float(args.get("go_timeout", 120)))
    probe_ok, probe_s = await c.request()
    served = 0
    results = await asyncio.gather(*(c.request_on(r, w) for r, w in held), return_exceptions=True)
    for res in results:
        if res is True:
            served += 1
        elif isinstance(res, BaseException):
            c.err(res)
        else:
            c.errors["bad-response"] = c.errors.get("bad-response", 0) + 1
    return {"scenario": "hold", "n": n, "held": len(held), "served": served, "open_s": round(opened_s, 3),
            "go": go, "probe_ok": probe_ok, "probe_s": round(probe_s, 3), "errors": c.errors}


async def churn(args: dict) -> dict:
    c = Client(args)
    n, conc = int(args["n"]), int(args.get("concurrency", 50))
    gate = asyncio.Semaphore(conc)
    ok = 0
    lat: list[float] = []

    async def one():
        nonlocal ok
        async with gate:
            good, s = await c.request()
            if good:
                ok += 1
                lat.append(s)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.monotonic() - t0
    lat.sort()
    return {"scenario": "churn", "n": n, "concurrency": conc, "served": ok, "seconds": round(dt, 3),
            "per_s": round(ok / dt, 1) if dt else None,
            "p50_s": round(lat[len(lat) // 2], 4) if lat else None,
            "p99_s": round(lat[int(len(lat) * 0.99)], 4) if lat else None, "errors": c.errors}


def client_hello(host: str) -> bytes:
    """A real ClientHello from OpenSSL (memory BIOs: nothing is sent)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def slow(args: dict) -> dict:
    c = Client(args)
    hello = client_hello(c.host)
    interval = float(args.get("interval", 0.5))
    n_slow, n_silent = int(args.get("slow", 0)), int(args.get("silent", 0))
    closed_after: list[float] = []
    still_open = 0
    sent_bytes: list[int] = []

    async def trickle(silent: bool):
        nonlocal still_open
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(c.host, c.port), c.timeout)
        except Exception as exc:
            c.err(exc)
            return
        t0 = time.monotonic()
        i = 0
        limit = t0 + float(args.get("give_up", 30))
        while time.monotonic() < limit:
            if not silent and i < len(hello):
                try:
                    w.write(hello[i:i + 1])
                    await w.drain()
                    i += 1
                except OSError:
                    break
            try:
                data = await asyncio.wait_for(r.read(1024), interval)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
        else:
            still_open += 1
            w.close()
            return
        closed_after.append(time.monotonic() - t0)
        sent_bytes.append(i)
        w.close()
        if args.get("exit_on_first_close"):  # leave the rest to end with the sandbox
            os._exit(int(args.get("exit", 0)))

    async def probes():
        res = []
        await asyncio.sleep(float(args.get("probe_delay", 1.0)))  # let the slow ones connect
        for _ in range(int(args.get("probes", 5))):
            res.append(await c.request())
        return res

    tasks = [trickle(False) for _ in range(n_slow)] + [trickle(True) for _ in range(n_silent)]
    out = await asyncio.gather(probes(), *tasks)
    pr = out[0]
    if args.get("barrier"):
        # One last allowed connection: its ACK comes after every earlier verdict on the
        # proxy's channel, so those are recorded before the command exits.
        pr.append(await c.request())
    closed_after.sort()
    return {"scenario": "slow", "slow": n_slow, "silent": n_silent, "hello_bytes": len(hello),
            "closed": len(closed_after), "still_open": still_open,
            "closed_min_s": round(closed_after[0], 2) if closed_after else None,
            "closed_max_s": round(closed_after[-1], 2) if closed_after else None,
            "max_bytes_sent": max(sent_bytes) if sent_bytes else None,
            "probes_ok": sum(1 for ok, _ in pr if ok), "probes": len(pr),
            "probe_max_s": round(max(s for _, s in pr), 3) if pr else None, "errors": c.errors}


def huge_hello(host: str, size: int) -> bytes:
    name = host.encode()
    sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    ext = struct.pack("!HH", 0, len(sni)) + sni
    fixed = 2 + 32 + 1 + 4 + 2 + 2 + len(ext) + 4  # up to the padding extension's data
    pad = max(0, size - fixed)
    tail = b""
    if pad > 0xFFFF - len(ext) - 4:  # beyond what the length fields can say: a hello
        tail = b"\0" * (pad - 60_000)  # whose handshake length claims it all, junk after
        pad = 60_000
    ext += struct.pack("!HH", 21, pad) + b"\0" * pad
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(ext)) + ext + tail
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    records = b""
    for i in range(0, len(hs), 16384):
        chunk = hs[i:i + 16384]
        records += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return records


async def huge(args: dict) -> dict:
    c = Client(args)
    size = int(args["size"])
    data = huge_hello(c.host, size)
    outcome = "open"
    got = b""
    t0 = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(c.host, c.port), c.timeout)
        w.write(data)
        try:
            await w.drain()
        except OSError as exc:
            outcome = classify(exc)
        try:
            got = await asyncio.wait_for(r.read(4096), 15)
            outcome = "closed" if not got else "answered"
        except TimeoutError:
            outcome = "no-answer"
        except OSError as exc:
            outcome = classify(exc)
        w.close()
    except Exception as exc:
        c.err(exc)
    ok, s = await c.request()
    return {"scenario": "huge", "size": size, "wire_bytes": len(data), "outcome": outcome,
            "reply_head": got[:8].hex(), "seconds": round(time.monotonic() - t0, 3),
            "probe_ok": ok, "probe_s": round(s, 3), "errors": c.errors}


async def fds(args: dict) -> dict:
    c = Client(args)
    n = int(args["n"])
    gate = asyncio.Semaphore(int(args.get("open_concurrency", 50)))
    held: list = []

    async def one():
        async with gate:
            try:
                held.append(await c.open())
            except Exception as exc:
                c.err(exc)

    await asyncio.gather(*(one() for _ in range(n)))
    n_held = len(held)
    for _r, w in held:
        w.close()
    await asyncio.sleep(0)
    # The proxy sees the closes asynchronously: retry the probe for a bounded time.
    ok, s, tries = False, 0.0, 0
    deadline = time.monotonic() + 20
    while not ok and time.monotonic() < deadline:
        ok, s = await c.request()
        tries += 1
    return {"scenario": "fds", "n": n, "held": n_held, "probe_ok": ok, "probe_s": round(s, 3),
            "probe_tries": tries, "errors": c.errors}


def main() -> int:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)  # die of it: the exit status is 128+N
    scenario, args, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    fn = {"hold": hold, "churn": churn, "slow": slow, "huge": huge, "fds": fds}[scenario]
    res = asyncio.run(fn(args))
    import resource

    res["rlimit_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    with open(result + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(result + ".tmp", result)
    print(json.dumps(res))
    return int(args.get("exit", 0))


if __name__ == "__main__":
    sys.exit(main())
