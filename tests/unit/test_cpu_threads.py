"""The CPU engine's intra-op threads: torch's count capped by the CPUs the process may use, or
--threads; the cgroup CPU quota as cgroup v2 and v1 state it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.engine.core.cpu_threads import cgroup_cpu_quota, choose_threads, set_engine_threads


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_quota_is_read_from_the_process_cgroup_before_the_root(tmp_path: Path) -> None:
    root, own = tmp_path / "cg", tmp_path / "self-cgroup"
    _write(own, "0::/kubepods/pod1\n")
    assert cgroup_cpu_quota(root, own) is None  # no files: no quota
    _write(root / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root, own) is None  # v2 without a limit
    _write(root / "cpu.max", "400000 100000\n")
    assert cgroup_cpu_quota(root, own) == 4.0
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(root, own) == 1.5  # the process's own cgroup first


def test_a_v1_quota_is_read_and_minus_one_means_none(tmp_path: Path) -> None:
    root, own = tmp_path / "cg", tmp_path / "self-cgroup"
    _write(own, "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n")
    cpu = root / "cpu,cpuacct" / "docker" / "abc"
    _write(cpu / "cpu.cfs_quota_us", "-1\n")
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, own) is None
    _write(cpu / "cpu.cfs_quota_us", "250000\n")
    assert cgroup_cpu_quota(root, own) == 2.5


@pytest.mark.parametrize(
    ("requested", "default", "affinity", "quota", "threads"),
    [
        (0, 2, 2, None, 2),  # nothing limits: torch's count
        (0, 16, 2, None, 2),  # taskset -c 0,1 on a 16-core machine
        (0, 16, 16, 1.5, 2),  # docker --cpus 1.5: two CPUs busy at most
        (0, 16, 16, 0.5, 1),
        (0, 2, 16, 4.0, 2),  # never more than torch's own count
        (3, 2, 2, None, 3),  # asked for: honoured, with a warning
    ],
)
def test_auto_caps_torch_count_by_the_usable_cpus(
    requested: int, default: int, affinity: int, quota: float | None, threads: int
) -> None:
    choice = choose_threads(requested, default, affinity, quota)
    assert choice.threads == threads
    text = choice.describe()
    assert text.startswith(f"{threads} intra-op threads")
    assert ("wait on one another" in text) == (requested > choice.usable)


@pytest.mark.parametrize(
    ("requested", "engines", "threads", "warned"),
    [
        (0, 2, 1, False),  # `pagoda serve --model a --model b` on 2 CPUs: one thread each
        (0, 3, 1, True),  # more engines than CPUs: one each, and the log says so
        (4, 2, 2, True),  # --threads is the count for all the engines, shared
    ],
)
def test_the_engines_of_a_process_share_the_count(
    requested: int, engines: int, threads: int, warned: bool
) -> None:
    choice = choose_threads(requested, 2, 2, None, engines)
    assert choice.threads == threads
    text = choice.describe()
    assert f"{threads} intra-op threads each for {engines} engines" in text
    assert ("wait on one another" in text) == warned


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        choose_threads(-1, 2, 2, None)


def test_the_count_is_what_torch_steps_with() -> None:
    before = torch.get_num_threads()
    try:
        assert set_engine_threads(1).threads == 1 and torch.get_num_threads() == 1
        auto = set_engine_threads(0)  # torch's count is 1 now: auto keeps it
        assert auto.threads == 1 and "auto" in auto.describe()
    finally:
        torch.set_num_threads(before)
