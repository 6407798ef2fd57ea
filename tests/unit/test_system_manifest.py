"""The system manifest and the package lists: real trees on disk, real (fake) tools on PATH."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from stead.config.init import create_cluster, parse_node_spec
from stead.config.load import load
from stead.errors import ProtocolError, SteadError, UsageError
from stead.system.manifest import (
    PathEntry,
    Scope,
    SystemManifest,
    build_manifest,
    hash_file,
    manifest_of_paths,
    virtual_mounts,
)
from stead.system.packages import list_packages, parse_dpkg, parse_rpm, pick_manager
from stead.system.snapshot import decode_snapshot, encode_snapshot, take_snapshot


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small system tree: files, a directory, a symlink out of the tree, a FIFO."""
    root = tmp_path / "etc"
    (root / "app" / "conf.d").mkdir(parents=True)
    (root / "app" / "app.conf").write_text("listen = 80\n")
    (root / "app" / "conf.d" / "10-extra.conf").write_text("extra = 1\n")
    (root / "secret").write_text("key\n")
    (root / "secret").chmod(0o600)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "must-not-appear").write_text("x\n")
    (root / "link").symlink_to(outside)
    os.mkfifo(root / "pipe")
    return root


def manifest(*trees: Path, **scope: tuple[str, ...]) -> SystemManifest:
    return build_manifest(Scope(trees=tuple(str(t) for t in trees), **scope), virtual=frozenset())


def test_records_type_mode_owner_and_content(tree: Path) -> None:
    found = manifest(tree)
    root = str(tree)
    assert sorted(found.entries) == [
        root,
        f"{root}/app",
        f"{root}/app/app.conf",
        f"{root}/app/conf.d",
        f"{root}/app/conf.d/10-extra.conf",
        f"{root}/link",
        f"{root}/pipe",
        f"{root}/secret",
    ]
    conf = found.entries[f"{root}/app/app.conf"]
    assert conf.kind == "file"
    assert conf.size == len("listen = 80\n")
    assert conf.digest == blake3.blake3(b"listen = 80\n").digest()
    assert (conf.uid, conf.gid) == (os.getuid(), os.getgid())
    assert found.entries[f"{root}/secret"].mode == 0o600
    assert found.entries[f"{root}/app"].kind == "dir"
    assert found.entries[f"{root}/pipe"].kind == "fifo"  # recorded, never opened
    link = found.entries[f"{root}/link"]
    assert link.kind == "symlink"
    assert link.target == str(tree.parent / "outside")
    assert link.digest == b""
    assert not any("must-not-appear" in p for p in found.entries)  # not followed
    assert found.preserved == found.skipped == found.missing == []


def test_a_symlinked_tree_root_is_not_followed(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(tree)
    found = manifest(tmp_path / "alias")
    assert list(found.entries) == [str(tmp_path / "alias")]
    assert found.entries[str(tmp_path / "alias")].kind == "symlink"


def test_exclude_preserve_and_protected_subtrees(tree: Path) -> None:
    root = str(tree)
    (tree / "app" / "app.conf.swp").write_text("swap\n")
    (tree / "data").mkdir()
    (tree / "data" / "replicated").write_text("protected\n")
    found = manifest(
        tree,
        exclude=("*.swp", f"{root}/app/conf.d"),
        preserve=(f"{root}/secret", f"{root}/link"),
        skip=(f"{root}/data",),
    )
    assert sorted(found.entries) == [root, f"{root}/app", f"{root}/app/app.conf", f"{root}/pipe"]
    assert sorted(found.preserved) == [f"{root}/link", f"{root}/secret"]
    assert found.skipped == [f"{root}/data"]


def test_a_preserved_directory_covers_what_is_under_it(tree: Path) -> None:
    root = str(tree)
    for pattern in (f"{root}/app/**", f"{root}/app", "conf.d"):
        found = manifest(tree, preserve=(pattern,))
        top = f"{root}/app/conf.d" if pattern == "conf.d" else f"{root}/app"
        assert found.preserved == [top], pattern
        assert not any(p == top or p.startswith(top + "/") for p in found.entries)
        assert f"{root}/secret" in found.entries


def test_a_tree_inside_a_protected_path_and_a_missing_tree(tree: Path, tmp_path: Path) -> None:
    found = manifest(tree, tmp_path / "absent", skip=(str(tree.parent),))
    assert found.entries == {}
    assert found.skipped == [str(tree)]
    assert found.missing == [str(tmp_path / "absent")]


def test_virtual_file_systems_are_not_walked(tree: Path) -> None:
    found = build_manifest(Scope(trees=(str(tree),)), virtual=frozenset({str(tree / "app")}))
    assert found.skipped == [str(tree / "app")]
    assert not any("/app" in p for p in found.entries)


def test_mountinfo_names_virtual_mount_points(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        b"23 1 0:22 / /sys rw - sysfs sysfs rw\n"
        b"24 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"25 24 0:23 / /etc/with\\040space rw shared:1 - binfmt_misc x rw\n"
        b"27 24 0:25 / /mnt/fuse rw - fuse.sshfs host:/ rw\n"
        b"26 24 0:24 / /run rw - tmpfs tmpfs rw\n"
        b"garbage\n"
    )
    assert virtual_mounts(str(info)) == {"/proc", "/sys", "/etc/with space"}
    assert virtual_mounts(str(tmp_path / "absent")) == frozenset()
    assert "/proc" in virtual_mounts()  # this machine's own


def test_an_unreadable_file_is_reported_and_the_walk_goes_on(tree: Path) -> None:
    bad = str(tree / "app" / "app.conf")

    def failing(path: str) -> tuple[bytes, int]:
        if path == bad:
            raise PermissionError(13, "Permission denied")
        return hash_file(path)

    found = build_manifest(Scope(trees=(str(tree),)), hash_file=failing, virtual=frozenset())
    entry = found.entries[bad]
    assert (entry.kind, entry.error, entry.digest) == ("file", "Permission denied", b"")
    assert entry.size == len("listen = 80\n")  # from lstat
    assert found.entries[str(tree / "secret")].digest  # the others are hashed


def test_files_hash_wanted_declines_are_listed_by_size_and_never_read(tree: Path) -> None:
    """The reclone's active reads only the files a passive might already hold."""
    read: list[str] = []
    wanted = str(tree / "secret")

    def counting(path: str) -> tuple[bytes, int]:
        read.append(path)
        return hash_file(path)

    found = build_manifest(
        Scope(trees=(str(tree),)),
        hash_file=counting,
        virtual=frozenset(),
        hash_wanted=lambda path, size: path == wanted and size == 4,
    )
    assert read == [wanted]
    assert found.entries[wanted].digest == blake3.blake3(b"key\n").digest()
    declined = found.entries[str(tree / "app" / "app.conf")]
    assert (declined.digest, declined.size, declined.error) == (b"", len("listen = 80\n"), "")


def test_unreadable_for_real(tree: Path) -> None:
    """Permissions enforced for real: as root, in a child without the DAC capabilities."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's file-permission override")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    code = (
        "import json, sys\n"
        "from stead.system.manifest import Scope, build_manifest\n"
        "found = build_manifest(Scope(trees=(sys.argv[1],)), virtual=frozenset())\n"
        "print(json.dumps({p: e.error for p, e in found.entries.items()}))\n"
    )
    (tree / "secret").chmod(0)
    (tree / "app" / "conf.d").chmod(0)
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(tree)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        (tree / "app" / "conf.d").chmod(0o755)
        (tree / "secret").chmod(0o600)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout)
    assert errors[str(tree / "secret")] == "Permission denied"
    assert errors[str(tree / "app" / "conf.d")] == "cannot list: Permission denied"
    assert errors[str(tree / "app" / "app.conf")] == ""


def test_hash_file_refuses_a_symlink_and_a_directory(tree: Path) -> None:
    with pytest.raises(OSError, match="symbolic links"):  # O_NOFOLLOW: ELOOP
        hash_file(str(tree / "link"))
    with pytest.raises(OSError, match="something else than a file"):
        hash_file(str(tree / "app"))
    big = tree / "big"
    data = os.urandom(17 * 1024**2)  # past BIG_FILE: hashed on several threads
    big.write_bytes(data)
    assert hash_file(str(big)) == (blake3.blake3(data).digest(), len(data))


def test_non_utf8_names_survive_the_wire(tree: Path) -> None:
    raw = os.fsencode(tree) + b"/caf\xe9.conf"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name\n")
    found = manifest(tree)
    name = os.fsdecode(raw)
    assert name in found.entries
    snapshot = take_snapshot("n", Scope(trees=(str(tree),)), "none")
    back = decode_snapshot(encode_snapshot(snapshot))
    assert back.manifest is not None
    assert back.manifest.entries == snapshot.manifest.entries  # type: ignore[union-attr]
    assert os.fsencode(name) in {os.fsencode(p) for p in back.manifest.entries}
    assert back.packages == {} and back.manager == "none"


def test_too_many_paths_is_a_clear_error(tree: Path) -> None:
    with pytest.raises(UsageError, match="more than 3 paths"):
        build_manifest(Scope(trees=(str(tree),)), max_entries=3, virtual=frozenset())


def test_wire_form_is_checked() -> None:
    entry = PathEntry("/etc/x", "file", 0o644, 0, 0, 3, "", b"\0" * 32)
    assert PathEntry.from_wire(entry.to_wire()) == entry
    for bad in (
        ["etc/x", "file", 0o644, 0, 0, 3, "", b"", 0, ""],  # relative
        ["/etc/x", "door", 0o644, 0, 0, 3, "", b"", 0, ""],  # unknown type
        ["/etc/x", "file", -1, 0, 0, 3, "", b"", 0, ""],
        ["/etc/x", "file", 0o644, 0, 0, 3, "", b"short", 0, ""],
        ["/etc/x", "file", 0o644, 0, 0, 3, "", b""],
        "not a list",
    ):
        with pytest.raises(ProtocolError):
            PathEntry.from_wire(bad)
    with pytest.raises(ProtocolError):
        SystemManifest.from_wire({"entries": [], "preserved": [1]})
    with pytest.raises(ProtocolError):
        SystemManifest.from_wire({"preserved": []})


def test_entries_of_single_paths_are_those_a_walk_records(tree: Path, tmp_path: Path) -> None:
    """A reclone's fresh entries: no walk, but the scope's rules and no way out of the
    trees through a directory replaced by a symbolic link."""
    root = str(tree)
    scope = Scope(trees=(root,), exclude=(f"{root}/app/conf.d",))
    walked = build_manifest(scope, virtual=frozenset())
    asked = [
        f"{root}/app/app.conf",
        f"{root}/secret",
        f"{root}/link",
        f"{root}/app/conf.d/10-extra.conf",  # excluded with its directory
        f"{root}/gone",
        f"{root}/link/must-not-appear",  # through the symlink
        f"{root}/app/../secret",  # not normalised
        str(tmp_path / "outside" / "must-not-appear"),  # outside the trees
        root,  # the tree itself
    ]
    found = manifest_of_paths(scope, asked)
    assert sorted(found.entries) == [f"{root}/app/app.conf", f"{root}/link", f"{root}/secret"]
    for path, entry in found.entries.items():
        assert entry == walked.entries[path]
    # A directory on the way replaced by a symlink to a directory with the same names.
    shutil.move(str(tree / "app"), str(tmp_path / "moved-app"))
    (tree / "app").symlink_to(tmp_path / "moved-app")
    assert manifest_of_paths(scope, [f"{root}/app/app.conf"]).entries == {}


def test_scope_from_the_cluster_configuration(tmp_path: Path) -> None:
    nodes = [parse_node_spec("primary=198.18.0.11"), parse_node_spec("secondary=198.18.0.12")]
    directory = create_cluster(
        tmp_path / "c", cluster_name="t", nodes=nodes, active=None, protect=["/opt/data"]
    )
    cluster = load(directory / "nodes" / "primary").cluster
    scope = Scope.from_config(cluster)
    assert scope.trees == ("/etc", "/opt", "/usr/local")
    assert scope.skip == ("/opt/data",)
    assert "/etc/machine-id" in scope.preserve and "/etc/mtab" in scope.exclude
    assert scope.describe()["trees"] == ["/etc", "/opt", "/usr/local"]


# ---- packages ----------------------------------------------------------------------------

DPKG_OUTPUT = (
    "adduser\t3.134\tii \n"
    "libc6:amd64\t2.36-9\tii \n"
    "libc6:i386\t2.36-9\tii \n"
    "oldpkg\t1.0\trc \n"  # removed, configuration files left: not installed
    "held\t2.0\thi \n"
    "broken\t0.1\tiU \n"  # unpacked, not configured
    "bad line\n"
)


def test_parse_dpkg_keeps_installed_packages_only() -> None:
    assert parse_dpkg(DPKG_OUTPUT) == {
        "adduser": "3.134",
        "held": "2.0",
        "libc6:amd64": "2.36-9",
        "libc6:i386": "2.36-9",
    }


def test_parse_rpm_architectures_and_several_versions() -> None:
    text = (
        "bash.x86_64\t5.1.8-6.el9\n"
        "kernel.x86_64\t5.14.0-1.el9\n"
        "kernel.x86_64\t5.14.0-2.el9\n"
        "gpg-pubkey.(none)\tfd431d51-4ae0493b\n"
        "tzdata.noarch\t1:2024a-1.el9\n"
    )
    assert parse_rpm(text) == {
        "bash.x86_64": "5.1.8-6.el9",
        "gpg-pubkey": "fd431d51-4ae0493b",
        "kernel.x86_64": "5.14.0-1.el9, 5.14.0-2.el9",
        "tzdata.noarch": "1:2024a-1.el9",
    }


def fake_tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    tool = directory / name
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)


def test_list_packages_runs_the_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    quoted = DPKG_OUTPUT.replace("\t", "\\t").replace("\n", "\\n")
    fake_tool(bin_dir, "dpkg-query", f"printf '{quoted}'")
    fake_tool(bin_dir, "rpm", "echo 'rpm: database locked' >&2; exit 1")
    monkeypatch.setenv("PATH", str(bin_dir))
    manager, installed = list_packages("dpkg")
    assert manager == "dpkg" and installed["adduser"] == "3.134" and "oldpkg" not in installed
    with pytest.raises(SteadError, match="rpm failed: rpm: database locked"):
        list_packages("rpm")
    assert list_packages("none") == ("none", {})


def test_an_explicit_manager_must_be_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no tool at all
    with pytest.raises(UsageError, match="dpkg-query is not installed"):
        pick_manager("dpkg")
    with pytest.raises(UsageError, match="rpm is not installed"):
        list_packages("rpm")
    assert pick_manager("auto") == "none"
    with pytest.raises(UsageError, match="unknown package manager"):
        pick_manager("apk")
    fake_tool(tmp_path, "rpm", "exit 0")
    assert pick_manager("auto") == "rpm"
