"""tpi_runtime.cgroup_oom: finding and reading the container's OOM-kill counter.

The temp directories below are laid out like ``/sys/fs/cgroup`` and stand in for the kernel's
files (a test cannot choose the host's cgroup layout); the file formats are the kernel's
(Documentation/admin-guide/cgroup-v2.rst: memory.events; cgroup-v1/memory.rst: memory.oom_control).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tpi_runtime import cgroup_oom

V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"


@pytest.mark.parametrize(
    ("text", "count"),
    [
        (V2_EVENTS, 2),
        (V1_OOM_CONTROL, 5),
        ("oom_kill_disable 0\nunder_oom 0\n", None),  # v1 before kernel 4.13: no counter
        ("oom_kill x\n", None),
        ("", None),
    ],
)
def test_parse_counter(text: str, count: int | None) -> None:
    assert cgroup_oom.parse_counter(text) == count


@pytest.mark.parametrize(
    ("proc", "v1", "v2"),
    [
        ("0::/kubepods.slice/pod1/cri-abc.scope\n", None, "/kubepods.slice/pod1/cri-abc.scope"),
        ("0::/\n", None, "/"),  # v2 in a cgroup namespace
        ("12:memory:/kubepods/burstable/pod1/abc\n4:cpu,cpuacct:/x\n0::/\n", "/kubepods/burstable/pod1/abc", "/"),
        ("11:cpu,memory:/docker/abc\n", "/docker/abc", None),
        ("garbage\n", None, None),
    ],
)
def test_parse_proc_cgroup(proc: str, v1: str | None, v2: str | None) -> None:
    assert cgroup_oom.parse_proc_cgroup(proc) == (v1, v2)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def find(root: Path, proc: str, tmp: Path) -> cgroup_oom.OomCounter | None:
    (tmp / "proc-cgroup").write_text(proc)
    return cgroup_oom.find(str(root), str(tmp / "proc-cgroup"))


def test_v2_host_path(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "kubepods.slice/pod1/cri-abc.scope/memory.events", V2_EVENTS)
    write(root / "memory.events", "oom_kill 99\n")  # another cgroup's: never preferred
    c = find(root, "0::/kubepods.slice/pod1/cri-abc.scope\n", tmp_path)
    assert c is not None and c.version == 2 and c.read() == 2


def test_v2_container_sees_its_cgroup_at_the_top(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory.events", V2_EVENTS)
    c = find(root, "0::/kubepods.slice/pod1/cri-abc.scope\n", tmp_path)  # no cgroup namespace
    assert c is not None and c.path == str(root / "memory.events") and c.read() == 2


def test_v1_memory_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory/kubepods/pod1/abc/memory.oom_control", V1_OOM_CONTROL)
    c = find(root, "12:memory:/kubepods/pod1/abc\n0::/\n", tmp_path)
    assert c is not None and c.version == 1 and c.read() == 5


def test_v1_wins_on_a_hybrid_host_and_falls_back_to_the_mount_top(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory/memory.oom_control", V1_OOM_CONTROL)  # the container's own, at the top
    write(root / "unified/cgroup.procs", "")  # hybrid: v2 tree without the memory controller
    c = find(root, "4:memory:/process_api/abc\n0::/\n", tmp_path)
    assert c is not None and c.version == 1 and c.read() == 5


def test_no_counter_is_none_not_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n")  # kernel < 4.13
    assert find(root, "4:memory:/x\n", tmp_path) is None
    assert cgroup_oom.find(str(root), str(tmp_path / "missing")) is None


def test_counter_read_after_the_file_went_away(tmp_path: Path) -> None:
    write(tmp_path / "memory.events", V2_EVENTS)
    c = cgroup_oom.OomCounter(str(tmp_path / "memory.events"), 2)
    assert c.read() == 2
    (tmp_path / "memory.events").unlink()
    assert c.read() is None


def test_this_machine_has_a_readable_counter() -> None:
    """The real /sys/fs/cgroup of the machine running the tests (v1, v2 or hybrid)."""
    c = cgroup_oom.find()
    assert c is not None, "no oom_kill counter under /sys/fs/cgroup: the launcher could not tell OOM kills"
    assert isinstance(c.read(), int)
