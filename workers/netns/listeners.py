"""The proxy's listening sockets, made inside the sandbox namespace.

They are bound on the namespace's 127.0.0.1 and ::1 (port 443 needs
CAP_NET_BIND_SERVICE in the user namespace, so: before the capability drop), then
passed up to the supervisor by SCM_RIGHTS. The proxy worker accepts on them from the
host namespace: a socket stays in the namespace it was created in.
"""

from __future__ import annotations

import socket

from agentpen.workers.netns.errors import NetnsSetupError

ADDRESSES = ("127.0.0.1", "::1")


def create_proxy_listeners(port: int = 443, backlog: int = 1024,
                           addresses: tuple[str, ...] = ADDRESSES) -> list[socket.socket]:
    """Listening TCP sockets on each loopback address; all or nothing (fail closed)."""
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            if family == socket.AF_INET6:
                # ::1 only: no v4-mapped duplicates of the 127.0.0.1 socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accept
            sock.bind((addr, port))
            sock.listen(backlog)
            sock.setblocking(False)  # the proxy's event loop accepts
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise NetnsSetupError(
            f"could not listen on {addr} port {port} in the sandbox namespace: {exc}",
            "ports below 1024 need CAP_NET_BIND_SERVICE: create the listeners in the "
            "namespace pasta made, before dropping capabilities; the address must be free",
        ) from exc
    return socks
