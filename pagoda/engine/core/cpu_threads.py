"""How many intra-op threads a CPU engine steps with (`pagoda serve`/`pagoda worker --threads`).

torch's default is a thread per physical core of the machine, whatever share of it the process
may use. Where several processes share the cores (two workers on one host, `docker compose up
--scale worker=2`) or a container runs under a CPU quota (`docker --cpus`, a Kubernetes CPU
limit), each step then waits on threads that another process or the quota has descheduled: in
the fault tests' cluster (three workers of a tiny model on 2 cores) a 160-token stream took 6-9 s
with torch's default and 0.3-0.9 s with one thread a worker. `--threads 0` (the default) keeps
torch's count but never more than the CPUs this process may run on: its affinity mask (taskset,
cpusets) and its cgroup's CPU quota. The engines of one process (`pagoda serve` with several
`--model`) split the count evenly: each step thread keeps an OpenMP pool, and once the pools hold
more threads than there are cores every parallel region waits on a futex wake-up, the other engine
idle or not (build_off_main_thread's docstring). Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # what each engine steps with
    requested: int  # --threads, for all the engines (0: auto)
    default: int  # torch's own count
    affinity: int  # CPUs in the affinity mask
    quota: float | None  # the cgroup's CPU quota in CPUs (None: no quota)
    engines: int = 1  # the engines of this process, which share the count

    def describe(self) -> str:
        """One log line: the count and where it came from."""
        limits = f"{self.affinity} CPUs in its affinity mask"
        limits += f", a cgroup CPU quota of {self.quota:g}" if self.quota is not None else ", no CPU quota"
        each = f" each for {self.engines} engines" if self.engines > 1 else ""
        if self.requested:
            text = f"{self.threads} intra-op threads{each} (--threads {self.requested}); "
            text += f"this process may use {limits}"
        else:
            text = f"{self.threads} intra-op threads{each} (auto: torch's {self.default}, capped by {limits})"
        if self.threads * self.engines > self.usable:
            text += ": more threads than CPUs wait on one another (each step waits for the slowest)"
        return text

    @property
    def usable(self) -> int:
        return usable_cpus(self.affinity, self.quota)


def usable_cpus(affinity: int, quota: float | None) -> int:
    """The CPUs a process may keep busy at once: its affinity mask's, at most its quota rounded up."""
    return affinity if quota is None else max(1, min(affinity, math.ceil(quota)))


def cgroup_cpu_quota(root: Path = CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """This process's CPU quota in CPUs (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), or None where there is none or it cannot be read. The process's own
    cgroup is read first (its path from /proc/self/cgroup), then the mount's root (inside a
    container, the container's cgroup)."""
    own: list[Path] = []
    try:
        for line in self_cgroup.read_text().splitlines():
            hierarchy, _, path = line.partition(":")[2].partition(":")
            if hierarchy == "" and path.strip("/"):
                own.append(root / path.strip("/"))  # v2: "0::/path"
            elif "cpu" in hierarchy.split(",") and path.strip("/"):
                own.append(root / hierarchy / path.strip("/"))
    except OSError:
        pass
    for directory in [*own, root]:
        quota = _v2_quota(directory / "cpu.max")
        if quota is not None:
            return quota
    for directory in [*own, root / "cpu", root / "cpu,cpuacct"]:
        quota = _v1_quota(directory)
        if quota is not None:
            return quota
    return None


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def choose_threads(
    requested: int, default: int, affinity: int, quota: float | None, engines: int = 1
) -> ThreadChoice:
    """`requested` threads in all (0: torch's `default`, at most the usable CPUs), an even share
    for each of `engines` (at least one)."""
    if requested < 0:
        raise ValueError(f"--threads must be >= 0 (0: auto), got {requested}")
    total = requested or max(1, min(default, usable_cpus(affinity, quota)))
    return ThreadChoice(max(1, total // engines), requested, default, affinity, quota, engines)


def engine_threads(requested: int, engines: int = 1) -> ThreadChoice:
    """What `set_engine_threads` would choose in this process now (torch's count, this process's
    affinity mask and CPU quota), without setting it."""
    import torch

    return choose_threads(requested, torch.get_num_threads(), affinity_cpus(), cgroup_cpu_quota(), engines)


def set_engine_threads(requested: int, engines: int = 1) -> ThreadChoice:
    """Sets torch's intra-op threads for the `engines` this process builds from now on (before
    any is built: the ranks of a parallel engine split this count again), logs and returns the
    choice."""
    import torch

    choice = engine_threads(requested, engines)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    logger.info("engine: %s", choice.describe())
    return choice
