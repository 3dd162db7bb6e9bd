"""What this host can enforce, layer by layer, with the exact fix for this distro.

`agentpen --check` runs every probe (some fork a user namespace); a normal run
uses `preflight()`, the subset that costs no process, and refuses with the same
diagnosis when a required layer is missing. Anything deeper (pasta, nft inside
the namespace) fails closed where it runs, with its own message.
"""

from __future__ import annotations

import json
import os
import subprocess

from agentpen.core.osutil import load_libc
from agentpen.core.record import asdict, record
from agentpen.core.which import which
from agentpen.supervisor.errors import LayerUnavailable

MIN_BWRAP = (0, 8, 0)  # --disable-userns appeared in 0.8.0


@record
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
    if family == "unknown":
        return "; ".join(f"{name}: {_INSTALL[f].format(**_PKG[tool])}"
                         for name, f in (("Debian/Ubuntu", "debian"), ("Fedora", "fedora"),
                                         ("Arch", "arch"), ("NixOS", "nixos")))
    return _INSTALL[family].format(**_PKG[tool])


def _sysctl_fix(setting: str, family: str) -> str:
    key, value = setting.split("=")
    if family == "nixos":
        return (f'set boot.kernel.sysctl."{key}" = {value}; in configuration.nix, then '
                "sudo nixos-rebuild switch")
    return (f"echo '{setting}' | sudo tee /etc/sysctl.d/60-agentpen.conf && sudo sysctl --system")


APPARMOR_PROFILE = (
    "abi <abi/4.0>,\\ninclude <tunables/global>\\nprofile agentpen-{name} {path} flags=(unconfined) "
    "{{\\n  userns,\\n  include if exists <local/agentpen-{name}>\\n}}\\n"
)


def apparmor_fix(bwrap: str = "/usr/bin/bwrap") -> str:
    """Ubuntu 24.04+: let exactly bwrap create user namespaces (an AppArmor profile),
    rather than lifting the restriction for every program. pasta needs none: the
    passt package's own AppArmor profile allows it (`userns,`)."""
    prof = APPARMOR_PROFILE.format(name="bwrap", path=bwrap)
    return (f"printf '{prof}' | sudo tee /etc/apparmor.d/agentpen-bwrap && "
            "sudo apparmor_parser -r /etc/apparmor.d/agentpen-bwrap  (or, for every program: "
            + _sysctl_fix("kernel.apparmor_restrict_unprivileged_userns=0", "ubuntu") + ")")


def userns_fix(reason: str, family: str | None = None) -> str:
    """reason: 'apparmor' | 'clone' (Debian/Arch-hardened sysctl) | 'max' | 'kernel'."""
    family = family or distro()
    if reason == "apparmor":
        return apparmor_fix(_which("bwrap") or "/usr/bin/bwrap")
    if reason == "clone":
        if family == "nixos":
            return ("set security.unprivilegedUsernsClone = true; in configuration.nix (hardened "
                    "kernel), then sudo nixos-rebuild switch")
        fix = _sysctl_fix("kernel.unprivileged_userns_clone=1", family)
        if family == "arch":
            fix += " (linux-hardened; or boot the stock linux kernel)"
        return fix
    if reason == "max":
        return _sysctl_fix("user.max_user_namespaces=15000", family)
    return {
        "nixos": "use a kernel with CONFIG_USER_NS=y (the default NixOS kernels have it)",
        "fedora": "use the stock Fedora kernel (CONFIG_USER_NS=y)",
        "arch": "use the stock linux kernel, or on linux-hardened: "
                + _sysctl_fix("kernel.unprivileged_userns_clone=1", "arch"),
    }.get(family, "use a kernel built with CONFIG_USER_NS=y, and check "
                  "kernel.unprivileged_userns_clone / user.max_user_namespaces")


def tun_fix(err: int | None, family: str | None = None, *, in_container: bool = False) -> str:
    """/dev/net/tun missing (ENOENT/ENODEV: module not loaded) or not openable (EACCES/EPERM)."""
    import errno as _errno

    family = family or distro()
    if in_container:
        return ("agentpen runs inside a container: start it with the device, e.g. "
                "docker run --device /dev/net/tun ... (podman: --device /dev/net/tun)")
    if err in (_errno.ENOENT, _errno.ENODEV, _errno.ENXIO):
        if family == "nixos":
            return 'add "tun" to boot.kernelModules in configuration.nix, then sudo nixos-rebuild switch'
        return ("sudo modprobe tun && echo tun | sudo tee /etc/modules-load.d/agentpen-tun.conf "
                "(loads it now and at every boot)")
    if family == "nixos":
        return ("add services.udev.extraRules = ''KERNEL==\"tun\", MODE=\"0666\"''; to "
                "configuration.nix, then sudo nixos-rebuild switch")
    return ("sudo chmod 0666 /dev/net/tun && echo 'KERNEL==\"tun\", MODE=\"0666\"' | "
            "sudo tee /etc/udev/rules.d/60-agentpen-tun.rules && sudo udevadm control --reload "
            "(0666 is its usual mode; the rule keeps it after a reboot)")


def nft_kernel_fix(family: str | None = None) -> str:
    family = family or distro()
    if family == "nixos":
        return ('add "nf_tables" to boot.kernelModules and pkgs.nftables to '
                "environment.systemPackages, then sudo nixos-rebuild switch")
    return ("sudo modprobe nf_tables && echo nf_tables | sudo tee /etc/modules-load.d/agentpen-nft.conf; "
            + install_fix("nft", family))


def _which(name: str) -> str | None:
    return which(name) or which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


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


def in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv") or \
        (_read("/proc/1/environ") or "").find("container=") >= 0


def check_userns_sysctls() -> Layer:
    """Cheap: the sysctls that forbid unprivileged user namespaces."""
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return Layer("user namespaces", False, "kernel.unprivileged_userns_clone=0",
                     userns_fix("clone"))
    mx = _read("/proc/sys/user/max_user_namespaces")
    if mx is not None and mx.isdigit() and int(mx) == 0:
        return Layer("user namespaces", False, "user.max_user_namespaces=0", userns_fix("max"))
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        # Profiles may still grant bwrap/pasta the right: check_apparmor_userns decides.
        return Layer("user namespaces", True, "AppArmor restricts unprivileged user namespaces "
                     "(kernel.apparmor_restrict_unprivileged_userns=1); allowed only through profiles",
                     userns_fix("apparmor"))
    return Layer("user namespaces", True, f"allowed (max_user_namespaces={mx})")


def check_apparmor_userns() -> Layer:
    """Ubuntu 24.04+: with kernel.apparmor_restrict_unprivileged_userns=1 an unconfined
    program still gets a user namespace, but without capabilities in it: bwrap and
    pasta then fail to set it up. Run bwrap as agentpen will to see whether a profile
    grants it the right."""
    name = "AppArmor userns"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") != "1":
        return Layer(name, True, "no AppArmor user-namespace restriction", required=False)
    bwrap = _which("bwrap")
    if not bwrap:
        return Layer(name, False, "restricted, and bwrap is not installed to test", userns_fix("apparmor"))
    try:
        r = subprocess.run([bwrap, "--unshare-user", "--unshare-net", "--ro-bind", "/", "/", "true"],
                           capture_output=True, text=True, timeout=10, check=False)
        ok, err = r.returncode == 0, r.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, err = False, str(exc)
    if ok:
        return Layer(name, True, "restricted, but bwrap's AppArmor profile allows user namespaces")
    return Layer(name, False, f"kernel.apparmor_restrict_unprivileged_userns=1 and bwrap has no "
                 f"profile allowing user namespaces ({err or 'bwrap failed'})", userns_fix("apparmor"))


def check_userns_probe() -> Layer:
    """Really create a user namespace (a forked child), as bwrap and pasta will."""
    libc = load_libc()
    pid = os.fork()
    if pid == 0:
        rc = libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
        os._exit(0 if rc == 0 else 1)
    _, status = os.waitpid(pid, 0)
    base = check_userns_sysctls()
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return Layer("user namespaces", True, "an unprivileged user+network namespace was created")
    return Layer("user namespaces", False, "creating an unprivileged user namespace failed"
                 + (f": {base.detail}" if base.detail else ""), base.fix or userns_fix("kernel"))


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


def _open_tun() -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    os.close(fd)


def check_tun() -> Layer:
    try:
        _open_tun()
        return Layer("/dev/net/tun", True, "readable and writable")
    except OSError as exc:
        missing = not os.path.exists("/dev/net/tun")
        what = "/dev/net/tun does not exist" if missing else f"cannot open /dev/net/tun: {exc.strerror}"
        return Layer("/dev/net/tun", False, what + " (pasta needs it for the sandbox's network)",
                     tun_fix(exc.errno, in_container=in_container()))


def check_nft(*, probe: bool) -> Layer:
    path = _which("nft")
    if not path:
        return Layer("nftables", False, "nft not found", install_fix("nft"))
    if not probe:
        return Layer("nftables", True, path)
    # nft inside a fresh user+network namespace, as the netns worker will run it.
    libc = load_libc()
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
            os.execv(path, [path, "add", "table", "inet", "agentpen_check"])  # noqa: S606
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
    return Layer("nftables", False,
                 f"nft failed inside a user namespace: {out.decode(errors='replace').strip()}",
                 nft_kernel_fix())


def check_seccomp() -> Layer:
    try:
        from agentpen.core.osutil import import_pyseccomp

        pyseccomp = import_pyseccomp()
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
    fam = distro()
    fix = {"debian": "sudo apt-get install -y coreutils (Debian 11+ / Ubuntu 20.04+ ship >= 8.31)",
           "ubuntu": "sudo apt-get install -y coreutils (Ubuntu 20.04+ ships >= 8.31)",
           "fedora": "sudo dnf install -y coreutils", "arch": "sudo pacman -S --needed coreutils",
           "nixos": "add pkgs.coreutils to environment.systemPackages"}.get(
               fam, "install GNU coreutils >= 8.31")
    return Layer("terminal signals", False, "GNU env with --default-signal (coreutils >= 8.31) is "
                 "needed so Ctrl-C reaches the command and not bubblewrap", fix)


def check_kernel() -> Layer:
    rel, arch = os.uname().release, os.uname().machine
    ok = arch in ("x86_64", "aarch64")
    return Layer("kernel", ok, f"Linux {rel} {arch}",
                 None if ok else "agentpen's seccomp table covers x86_64 and aarch64 only")


def check_cgroup() -> Layer:
    """Optional: a delegated cgroup v2 lets --memory/--max-procs (and paranoid) cap the
    whole session and audit when a cap is hit; without it they are per-process rlimits."""
    from agentpen.supervisor.cgroup import NotDelegated, delegated_parent

    try:
        _, parent = delegated_parent()
    except NotDelegated as exc:
        fix = ("run agentpen inside a delegated user scope: systemd-run --user --scope agentpen ... "
               "(systemd hosts; per-process rlimits are used otherwise)")
        return Layer("cgroup v2 caps", False, f"not delegated: {exc}", fix, required=False)
    return Layer("cgroup v2 caps", True, f"session caps go in a sibling cgroup under {parent}",
                 required=False)


def full_report() -> list[Layer]:
    return [
        check_kernel(),
        check_not_root(),
        check_userns_probe(),
        check_apparmor_userns(),
        check_bwrap(probe=True),
        check_pasta(probe=True),
        check_tun(),
        check_nft(probe=True),
        check_seccomp(),
        check_env_default_signal(),
        check_cgroup(),
    ]


def preflight() -> None:
    """The cheap checks of a normal run. Raises LayerUnavailable on the first gap."""
    # check_apparmor_userns forks bwrap only where the AppArmor restriction is on.
    for layer in (check_not_root(), check_kernel(), check_userns_sysctls(), check_bwrap(probe=False),
                  check_apparmor_userns(), check_pasta(probe=False), check_tun(), check_nft(probe=False)):
        if not layer.ok:
            raise LayerUnavailable(f"{layer.name}: {layer.detail}", fix=layer.fix)


_FAMILY_NAME = {"debian": "Debian", "ubuntu": "Ubuntu", "fedora": "Fedora/RHEL", "arch": "Arch",
                "nixos": "NixOS", "unknown": "unknown distribution"}


def render(layers: list[Layer], *, as_json: bool, color: bool, family: str | None = None) -> str:
    family = family or distro()
    if as_json:
        return json.dumps({"ok": all(x.ok for x in layers if x.required),
                           "distro": family, "layers": [asdict(x) for x in layers]}, indent=2)

    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    width = max(len(x.name) for x in [*layers, Layer("LAYER", True, "")])
    lines = [f"agentpen --check on {_FAMILY_NAME.get(family, family)} ({os.uname().release})", "",
             paint(f"{'LAYER'.ljust(width)}  {'STATUS':<8} DETAIL", "1")]
    for x in layers:
        if x.ok:
            mark = paint(f"{'ok':<8}", "32")
        elif x.required:
            mark = paint(f"{'MISSING':<8}", "1;31")
        else:
            mark = paint(f"{'optional':<8}", "33")
        lines.append(f"{x.name.ljust(width)}  {mark} {x.detail}")
        if x.fix and not x.ok:
            lines.append(f"{'':{width}}  {paint('fix:', '36'):<8} {x.fix}")
    verdict = all(x.ok for x in layers if x.required)
    lines.append("")
    lines.append(paint("all layers can be enforced", "32") if verdict else
                 paint("agentpen will refuse to run until the MISSING layers are fixed", "31"))
    return "\n".join(lines)
