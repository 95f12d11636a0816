"""How many CPU threads a run uses: train.threads, OMP_NUM_THREADS, or a governor that shares the cores.

With train.threads = 0 and no OMP_NUM_THREADS, a run uses every core while the machine is otherwise idle
and one core fewer for each core other processes keep busy, re-checked every few seconds. The reason is
OpenMP's spinning barriers: a small network's operators synchronise their threads thousands of times a
second, so a thread that has to wait for a core held by another process stalls every operator (measured
here: a 2-thread run beside a busy 1-thread process trained at a quarter of its quiet rate; BENCHMARKS.md).
Busy cores are read from /proc/stat's lines for the cores this process may run on (its affinity), minus
this process's own CPU time (Linux; elsewhere every core).
"""

from __future__ import annotations

import os
import time

import torch


def _total_busy_jiffies(cpus: frozenset[int] | None = None, stat: str = "/proc/stat") -> tuple[float, float] | None:
    """(busy, total) jiffies since boot of the CPUs this process may run on (`cpus`; None: all), from
    /proc/stat's per-CPU lines: on a node shared through CPU pinning (SLURM, taskset) the load of cores
    this process cannot use is no reason to give up threads."""
    busy = total = 0.0
    found = False
    try:
        with open(stat) as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    if found:
                        break
                    continue
                if cpus is not None and int(name[3:]) not in cpus:
                    continue
                fields = [float(v) for v in values]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
                busy, total, found = busy + sum(fields) - idle, total + sum(fields), True
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if found else None


def _allowed_cpus() -> frozenset[int] | None:
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _own_jiffies() -> float:
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadGovernor:
    """Sets torch's thread count at start and, when automatic, again every `every_s` seconds."""

    def __init__(self, requested: int = 0, *, every_s: float = 5.0, enabled: bool = True):
        self.cores = usable_cores()
        self.cpus = _allowed_cpus()
        if not enabled:  # GPU runs: the CPU threads only feed the device
            requested = torch.get_num_threads()
        self.auto = requested == 0 and "OMP_NUM_THREADS" not in os.environ
        self.every_s = every_s
        self.threads = requested or (torch.get_num_threads() if not self.auto else self.cores)
        self._mark = None
        if requested and enabled:
            torch.set_num_threads(requested)
        elif self.auto:
            self._set(self._free_cores(probe_s=0.3))

    def _sample(self) -> tuple[float, float, float, float] | None:
        busy = _total_busy_jiffies(self.cpus)
        return None if busy is None else (*busy, _own_jiffies(), time.monotonic())

    def _others_busy(self, a: tuple, b: tuple) -> float:
        """Cores kept busy by other processes between two samples."""
        d_busy, d_total, d_own = b[0] - a[0], b[1] - a[1], b[2] - a[2]
        if d_total <= 0:
            return 0.0
        return max(0.0, (d_busy - d_own) / d_total * self.cores)

    def _free_cores(self, probe_s: float) -> int:
        a = self._sample()
        if a is None:
            return self.cores
        time.sleep(probe_s)
        b = self._sample()
        self._mark = b
        return self._from(self._others_busy(a, b))

    def _from(self, others: float) -> int:
        return max(1, min(self.cores, self.cores - int(others + 0.5)))

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads = n

    def tick(self) -> int:
        """Called every step: re-checks the other processes' load every `every_s` seconds (auto mode)."""
        if not self.auto:
            return self.threads
        now = time.monotonic()
        if self._mark is None:
            self._mark = self._sample()
        elif now - self._mark[3] >= self.every_s:
            b = self._sample()
            if b is not None:
                self._set(self._from(self._others_busy(self._mark, b)))
                self._mark = b
        return self.threads
