"""What this host can enforce, layer by layer, with the exact fix for this distro.

`agentpen --check` runs every probe (some fork a user namespace); a normal run
uses `preflight()`, the subset that costs no process, and refuses with the same
diagnosis when a required layer is missing. Anything deeper (pasta, nft inside
the namespace) fails closed where it runs, with its own message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

from agentpen.supervisor.errors import LayerUnavailable

MIN_BWRAP = (0, 8, 0)  # --disable-userns appeared in 0.8.0


@dataclass
class Layer:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


def distro() -> str:
    ids: list[str] = []
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith(("ID=", "ID_LIKE=")):
                    ids += line.split("=", 1)[1].strip().strip('"').split()
    except OSError:
        pass
    for family in ("nixos", "ubuntu", "debian", "fedora", "rhel", "arch"):
        if family in ids:
            return {"rhel": "fedora"}.get(family, family)
    return "unknown"


_INSTALL = {
    "debian": "sudo apt-get install -y {deb}",
    "ubuntu": "sudo apt-get install -y {deb}",
    "fedora": "sudo dnf install -y {rpm}",
    "arch": "sudo pacman -S --needed {arch}",
    "nixos": "add pkgs.{nix} to environment.systemPackages (or: nix-shell -p {nix})",
    "unknown": "install {deb} with your package manager",
}
_PKG = {
    "bwrap": {"deb": "bubblewrap", "rpm": "bubblewrap", "arch": "bubblewrap", "nix": "bubblewrap"},
    "pasta": {"deb": "passt", "rpm": "passt", "arch": "passt", "nix": "passt"},
    "nft": {"deb": "nftables", "rpm": "nftables", "arch": "nftables", "nix": "nftables"},
    "libseccomp": {"deb": "libseccomp2", "rpm": "libseccomp", "arch": "libseccomp", "nix": "libseccomp"},
}


def install_fix(tool: str, family: str | None = None) -> str:
    family = family or distro()
    return _INSTALL[family].format(**_PKG[tool])


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def check_not_root() -> Layer:
    if os.geteuid() == 0:
        return Layer("unprivileged user", False, "running as root: pasta refuses root, and a "
                     "confinement tool must not need it", "run agentpen as your normal user")
    return Layer("unprivileged user", True, f"uid {os.geteuid()}")


def check_userns_sysctls() -> Layer:
    """Cheap: the sysctls that forbid unprivileged user namespaces."""
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        fix = ("Ubuntu 24.04+ restricts unprivileged user namespaces through AppArmor. Allow them "
               "for bwrap and pasta with an AppArmor profile (e.g. /etc/apparmor.d/bwrap-userns-restrict "
               "from the bubblewrap package: sudo apparmor_parser -r /etc/apparmor.d/bwrap-userns-restrict), "
               "or system-wide: echo 'kernel.apparmor_restrict_unprivileged_userns=0' | "
               "sudo tee /etc/sysctl.d/60-userns.conf && sudo sysctl --system")
        # Profiles may still grant bwrap/pasta the right: the probe decides.
        return Layer("user namespaces", True, "AppArmor restricts unprivileged user namespaces "
                     "(kernel.apparmor_restrict_unprivileged_userns=1); allowed only through profiles",
                     fix)
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return Layer("user namespaces", False, "kernel.unprivileged_userns_clone=0",
                     "echo 'kernel.unprivileged_userns_clone=1' | sudo tee /etc/sysctl.d/60-userns.conf "
                     "&& sudo sysctl --system")
    mx = _read("/proc/sys/user/max_user_namespaces")
    if mx is not None and mx.isdigit() and int(mx) == 0:
        return Layer("user namespaces", False, "user.max_user_namespaces=0",
                     "echo 'user.max_user_namespaces=15000' | sudo tee /etc/sysctl.d/60-userns.conf "
                     "&& sudo sysctl --system")
    return Layer("user namespaces", True, f"allowed (max_user_namespaces={mx})")


def check_userns_probe() -> Layer:
    """Really create a user namespace (a forked child), as bwrap and pasta will."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pid = os.fork()
    if pid == 0:
        rc = libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
        os._exit(0 if rc == 0 else 1)
    _, status = os.waitpid(pid, 0)
    base = check_userns_sysctls()
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return Layer("user namespaces", True, "an unprivileged user+network namespace was created")
    return Layer("user namespaces", False, "creating an unprivileged user namespace failed"
                 + (f": {base.detail}" if base.detail else ""), base.fix or
                 "enable unprivileged user namespaces in the kernel (CONFIG_USER_NS) and sysctls")


def _version(path: str, flag: str = "--version") -> str:
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "syslog" not in ln]
    return lines[0].strip() if lines else ""


def check_bwrap(*, probe: bool) -> Layer:
    path = _which("bwrap")
    if not path:
        return Layer("bubblewrap", False, "bwrap not found", install_fix("bwrap"))
    if not probe:
        return Layer("bubblewrap", True, path)
    ver = _version(path)
    nums = tuple(int(x) for x in ver.split()[-1].split(".")[:3] if x.isdigit()) if ver else ()
    if nums and nums < MIN_BWRAP:
        return Layer("bubblewrap", False, f"{ver}: agentpen needs >= 0.8.0 (--disable-userns)",
                     install_fix("bwrap") + " (from a newer release)")
    return Layer("bubblewrap", True, f"{ver or 'bwrap'} at {path}")


def check_pasta(*, probe: bool) -> Layer:
    path = _which("pasta")
    if not path:
        return Layer("pasta", False, "pasta not found", install_fix("pasta"))
    if not probe:
        return Layer("pasta", True, path)
    try:
        from agentpen.workers.netns.pasta import detect_features

        feats = detect_features(path)
        return Layer("pasta", True, f"{path} ({len(getattr(feats, 'options', ()) or ())} options known)")
    except Exception as exc:
        return Layer("pasta", False, str(exc), install_fix("pasta"))


def check_tun() -> Layer:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        os.close(fd)
        return Layer("/dev/net/tun", True, "readable and writable")
    except OSError as exc:
        return Layer("/dev/net/tun", False, f"cannot open /dev/net/tun: {exc.strerror}",
                     "sudo chmod 0666 /dev/net/tun (its usual mode; make it stick with a udev rule: "
                     "KERNEL==\"tun\", MODE=\"0666\" in /etc/udev/rules.d/60-tun.rules)")


def check_nft(*, probe: bool) -> Layer:
    path = _which("nft")
    if not path:
        return Layer("nftables", False, "nft not found", install_fix("nft"))
    if not probe:
        return Layer("nftables", True, path)
    # nft inside a fresh user+network namespace, as the netns worker will run it.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if libc.unshare(0x10000000 | 0x40000000) != 0:
                os._exit(3)
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"0 {gid} 1")
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.execv(path, [path, "add", "table", "inet", "agentpen_check"])
        except BaseException:
            os._exit(4)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128
    if code == 0:
        return Layer("nftables", True, f"{path}: loads rules inside an unprivileged namespace")
    if code == 3:
        return Layer("nftables", False, "cannot create a user namespace to test nft",
                     check_userns_sysctls().fix)
    return Layer("nftables", False, f"nft failed inside a user namespace: {out.decode(errors='replace').strip()}",
                 "make sure the kernel has nf_tables (modprobe nf_tables) and " + install_fix("nft"))


def check_seccomp() -> Layer:
    try:
        import pyseccomp

        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.ERRNO(1), "ptrace")
        return Layer("seccomp", True, "libseccomp usable through pyseccomp")
    except Exception as exc:
        return Layer("seccomp", False, f"libseccomp not usable: {exc}", install_fix("libseccomp"))


def check_env_default_signal() -> Layer:
    env = _which("env")
    if env:
        try:
            rc = subprocess.run([env, "--default-signal=INT", "true"], capture_output=True,
                                timeout=5, check=False).returncode
        except (OSError, subprocess.TimeoutExpired):
            rc = 1
        if rc == 0:
            return Layer("terminal signals", True, f"{env} --default-signal")
    return Layer("terminal signals", False, "GNU env with --default-signal (coreutils >= 8.31) is "
                 "needed so Ctrl-C reaches the command and not bubblewrap",
                 "install GNU coreutils >= 8.31")


def check_kernel() -> Layer:
    rel = platform.release()
    arch = platform.machine()
    ok = arch in ("x86_64", "aarch64")
    return Layer("kernel", ok, f"Linux {rel} {arch}",
                 None if ok else "agentpen's seccomp table covers x86_64 and aarch64 only")


def full_report() -> list[Layer]:
    return [
        check_kernel(),
        check_not_root(),
        check_userns_probe(),
        check_bwrap(probe=True),
        check_pasta(probe=True),
        check_tun(),
        check_nft(probe=True),
        check_seccomp(),
        check_env_default_signal(),
    ]


def preflight() -> None:
    """The cheap checks of a normal run. Raises LayerUnavailable on the first gap."""
    for layer in (check_not_root(), check_kernel(), check_userns_sysctls(), check_bwrap(probe=False),
                  check_pasta(probe=False), check_tun(), check_nft(probe=False)):
        if not layer.ok:
            raise LayerUnavailable(f"{layer.name}: {layer.detail}", fix=layer.fix)


def render(layers: list[Layer], *, as_json: bool, color: bool) -> str:
    if as_json:
        return json.dumps({"ok": all(x.ok for x in layers if x.required),
                           "distro": distro(), "layers": [asdict(x) for x in layers]}, indent=2)
    width = max(len(x.name) for x in layers)
    lines = []
    for x in layers:
        mark = "ok" if x.ok else "MISSING"
        if color:
            mark = f"\033[32m{mark}\033[0m" if x.ok else f"\033[31m{mark}\033[0m"
        lines.append(f"{x.name.ljust(width)}  {mark:<7}  {x.detail}")
        if x.fix and not x.ok:
            lines.append(f"{'':{width}}  fix:     {x.fix}")
    verdict = all(x.ok for x in layers if x.required)
    lines.append("")
    lines.append("all layers can be enforced" if verdict else
                 "agentpen will refuse to run until the MISSING layers are fixed")
    return "\n".join(lines)
