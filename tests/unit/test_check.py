"""Issue 9: `agentpen --check` (supervisor/check.py) with faked probes: every missing
layer names the exact fix for the distribution."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest
from agentpen.supervisor import check
from agentpen.supervisor.errors import LayerUnavailable

FAMILIES = ("debian", "ubuntu", "fedora", "arch", "nixos")


def _fake_proc(monkeypatch, values: dict[str, str]):
    real = check._read

    def fake(path: str):
        if path in values:
            return values[path]
        if path.startswith("/proc/sys/"):
            return None
        return real(path)

    monkeypatch.setattr(check, "_read", fake)


@pytest.mark.parametrize("family, want", [
    ("debian", "sudo apt-get install -y passt"), ("ubuntu", "sudo apt-get install -y passt"),
    ("fedora", "sudo dnf install -y passt"), ("arch", "sudo pacman -S --needed passt"),
    ("nixos", "pkgs.passt"),
])
def test_missing_tool_fix_per_distro(monkeypatch, family, want):
    monkeypatch.setattr(check, "distro", lambda: family)
    monkeypatch.setattr(check, "_which", lambda name: None)
    layer = check.check_pasta(probe=False)
    assert not layer.ok and layer.fix is not None and want in layer.fix


def test_unknown_distro_lists_all_four():
    fix = check.install_fix("bwrap", "unknown")
    for s in ("apt-get", "dnf", "pacman", "pkgs.bubblewrap"):
        assert s in fix


def test_os_release_parsing(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    cases = {'ID=ubuntu\nID_LIKE=debian\n': "ubuntu", 'ID="rocky"\nID_LIKE="rhel centos fedora"\n': "fedora",
             "ID=nixos\n": "nixos", "ID=endeavouros\nID_LIKE=arch\n": "arch", "ID=alpine\n": "unknown"}
    for text, want in cases.items():
        f = tmp_path / "os-release"
        f.write_text(text)
        monkeypatch.setattr(builtins, "open", lambda p, *a, _f=f, **k: real_open(
            _f if p == "/etc/os-release" else p, *a, **k))
        assert check.distro() == want, text


@pytest.mark.parametrize("family", FAMILIES)
def test_userns_clone_zero(monkeypatch, family):
    monkeypatch.setattr(check, "distro", lambda: family)
    _fake_proc(monkeypatch, {"/proc/sys/kernel/unprivileged_userns_clone": "0"})
    layer = check.check_userns_sysctls()
    assert not layer.ok and "unprivileged_userns_clone" in layer.detail
    if family == "nixos":
        assert "security.unprivilegedUsernsClone = true" in layer.fix
    else:
        assert "kernel.unprivileged_userns_clone=1" in layer.fix and "sysctl --system" in layer.fix


def test_max_user_namespaces_zero(monkeypatch):
    monkeypatch.setattr(check, "distro", lambda: "fedora")
    _fake_proc(monkeypatch, {"/proc/sys/user/max_user_namespaces": "0"})
    layer = check.check_userns_sysctls()
    assert not layer.ok and "user.max_user_namespaces=15000" in layer.fix


def test_userns_allowed(monkeypatch):
    _fake_proc(monkeypatch, {"/proc/sys/user/max_user_namespaces": "1000"})
    assert check.check_userns_sysctls().ok  # control


def test_apparmor_restriction_denied_for_bwrap(monkeypatch):
    monkeypatch.setattr(check, "distro", lambda: "ubuntu")
    _fake_proc(monkeypatch, {"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1"})
    monkeypatch.setattr(check, "_which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "bwrap: setting up uid map: Permission denied"))
    layer = check.check_apparmor_userns()
    assert not layer.ok and "apparmor_restrict_unprivileged_userns=1" in layer.detail
    assert "Permission denied" in layer.detail
    assert "profile agentpen-bwrap /usr/bin/bwrap flags=(unconfined)" in layer.fix
    assert "userns," in layer.fix and "apparmor_parser -r /etc/apparmor.d/agentpen-bwrap" in layer.fix
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in layer.fix
    with pytest.raises(LayerUnavailable, match="AppArmor"):
        monkeypatch.setattr(check, "check_not_root", lambda: check.Layer("u", True, ""))
        monkeypatch.setattr(check, "check_tun", lambda: check.Layer("t", True, ""))
        check.preflight()


def test_apparmor_restriction_with_a_profile_is_fine(monkeypatch):
    _fake_proc(monkeypatch, {"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1"})
    monkeypatch.setattr(check, "_which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    assert check.check_apparmor_userns().ok


def test_no_apparmor_restriction_spawns_nothing(monkeypatch):
    _fake_proc(monkeypatch, {})

    def boom(*a, **k):
        raise AssertionError("no process without the restriction")

    monkeypatch.setattr(subprocess, "run", boom)
    assert check.check_apparmor_userns().ok


@pytest.mark.parametrize("family", FAMILIES)
def test_tun_not_openable(monkeypatch, family):
    monkeypatch.setattr(check, "distro", lambda: family)
    monkeypatch.setattr(check, "in_container", lambda: False)

    def denied():
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(check, "_open_tun", denied)
    layer = check.check_tun()
    assert not layer.ok and "Permission denied" in layer.detail
    if family == "nixos":
        assert "services.udev.extraRules" in layer.fix and 'MODE=\\"0666\\"' not in layer.fix
    else:
        assert "sudo chmod 0666 /dev/net/tun" in layer.fix and "/etc/udev/rules.d/" in layer.fix


@pytest.mark.parametrize("family", FAMILIES)
def test_tun_missing_module(monkeypatch, family):
    monkeypatch.setattr(check, "distro", lambda: family)
    monkeypatch.setattr(check, "in_container", lambda: False)

    def missing():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(check, "_open_tun", missing)
    layer = check.check_tun()
    assert not layer.ok
    assert ("boot.kernelModules" if family == "nixos" else "sudo modprobe tun") in layer.fix


def test_tun_in_a_container(monkeypatch):
    monkeypatch.setattr(check, "in_container", lambda: True)
    monkeypatch.setattr(check, "_open_tun", lambda: (_ for _ in ()).throw(
        FileNotFoundError(errno.ENOENT, "No such file or directory")))
    assert "--device /dev/net/tun" in check.check_tun().fix


def test_tun_ok(monkeypatch):
    monkeypatch.setattr(check, "_open_tun", lambda: None)
    assert check.check_tun().ok


def test_render_table_colour_and_json():
    layers = [check.Layer("kernel", True, "Linux x"),
              check.Layer("/dev/net/tun", False, "cannot open", "sudo chmod 0666 /dev/net/tun"),
              check.Layer("extra", False, "nice to have", "do it", required=False)]
    plain = check.render(layers, as_json=False, color=False, family="debian")
    assert "\033[" not in plain
    lines = plain.splitlines()
    assert lines[0].startswith("agentpen --check on Debian")
    assert lines[2].split() == ["LAYER", "STATUS", "DETAIL"]
    assert any(ln.split()[:2] == ["/dev/net/tun", "MISSING"] for ln in lines)
    assert any("fix:" in ln and "sudo chmod 0666" in ln for ln in lines)
    assert any(ln.split()[:2] == ["extra", "optional"] for ln in lines)
    assert "refuse to run" in lines[-1]
    coloured = check.render(layers, as_json=False, color=True, family="debian")
    assert "\033[1;31mMISSING" in coloured and "\033[32mok" in coloured
    data = json.loads(check.render(layers, as_json=True, color=False, family="arch"))
    assert data["ok"] is False and data["distro"] == "arch" and len(data["layers"]) == 3
    ok = check.render(layers[:1], as_json=False, color=False, family="nixos")
    assert ok.splitlines()[-1] == "all layers can be enforced"


def test_cgroup_layer_is_optional_and_says_why(monkeypatch):
    from agentpen.supervisor import cgroup

    def no(**kw):
        raise cgroup.NotDelegated("/sys/fs/cgroup/user.slice is not owned by uid 1000")

    monkeypatch.setattr(cgroup, "delegated_parent", no)
    layer = check.check_cgroup()
    assert not layer.ok and not layer.required and "not owned" in layer.detail
    assert "systemd-run --user --scope" in layer.fix
    monkeypatch.setattr(cgroup, "delegated_parent", lambda **kw: ("/cg/a/b", "/cg/a"))
    layer = check.check_cgroup()
    assert layer.ok and "/cg/a" in layer.detail
    text = check.render([layer, check.check_cgroup()], as_json=False, color=False, family="arch")
    assert text.splitlines()[-1] == "all layers can be enforced"
