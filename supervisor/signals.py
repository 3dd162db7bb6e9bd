"""Signals as readable events: block them and read them from a signalfd, so the
supervisor's one selectors loop sees signals, channels and child exits in order,
with the sender's pid (ssi_pid) for the audit stream."""

from __future__ import annotations

import ctypes
import os
import signal
import struct

from agentpen.core.osutil import load_libc
from agentpen.core.record import record

_libc = load_libc()
SFD_CLOEXEC = 0o2000000
SFD_NONBLOCK = 0o4000
_SIGINFO = struct.Struct("IiiIIiIIIIIiiQQQQQ")  # signalfd_siginfo head; 128 bytes in all
_SIGINFO_SIZE = 128


@record(frozen=True)
class SignalInfo:
    signo: int
    code: int
    pid: int
    uid: int


class SignalFd:
    def __init__(self, signals: list[int]) -> None:
        self.signals = list(signals)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        mask = ctypes.c_uint64(0)
        for s in self.signals:
            mask.value |= 1 << (s - 1)
        # sigset_t is 128 bytes in glibc; the kernel reads only the first 8 (sizemask).
        buf = ctypes.create_string_buffer(bytes(mask) + bytes(120))
        _libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        fd = _libc.signalfd(-1, buf, SFD_CLOEXEC | SFD_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"signalfd: {os.strerror(err)}")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[SignalInfo]:
        out: list[SignalInfo] = []
        while True:
            try:
                data = os.read(self.fd, _SIGINFO_SIZE * 16)
            except BlockingIOError:
                break
            for off in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
                f = _SIGINFO.unpack_from(data, off)
                out.append(SignalInfo(signo=f[0], code=f[2], pid=f[3], uid=f[4]))
            if len(data) < _SIGINFO_SIZE * 16:
                break
        return out

    def close(self) -> None:
        os.close(self.fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
