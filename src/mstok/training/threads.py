"""How many intra-op threads a CPU run uses: no more than the cores nobody else is using.

torch starts one intra-op thread per core. That is right on an idle machine and badly wrong
on a shared one: with 2 cores and another process keeping one of them busy, 2 intra-op
threads made a training step 10x slower (5 s instead of 0.5 s), because every parallel op
waits for its slowest thread, the one that shares a core with the other process. So an
``auto`` run counts the cores it may use, takes away the data-loader workers (each a
process that decodes images on a core of its own) and the cores other processes keep
busy, and keeps at least one thread. On CUDA the host threads only feed the GPU, so torch's
default is left alone unless a count is set explicitly; so is an ``OMP_NUM_THREADS`` set in the
environment (by the user, or by torchrun, which sets 1 for several ranks per machine).
"""

from __future__ import annotations

import math
import os
import time

import torch

_RUNNABLE_SAMPLES = 5  # reads of /proc/loadavg, spread over ~40 ms
_RUNNABLE_INTERVAL_S = 0.01


def choose_threads(cores: int, workers: int, load: float, processes: int = 1) -> int:
    """Intra-op threads per process for ``cores`` usable cores, ``workers`` data-loader processes
    per process and ``load`` cores' worth of other work (the 1-min load average: a process
    hogging a core adds ~1, so it is rounded down and a half-busy core still counts as free),
    shared by ``processes`` training processes on this machine (DDP ranks). At least 1."""
    free = cores - processes * workers - math.floor(max(load, 0.0))
    return max(1, free // max(processes, 1))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def runnable_others() -> float | None:
    """Tasks other than this one that are runnable right now (mean of a few reads of Linux's
    ``/proc/loadavg``), or None where there is no such file."""
    counts = []
    for i in range(_RUNNABLE_SAMPLES):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)  # the reading thread is runnable itself
        if i + 1 < _RUNNABLE_SAMPLES:
            time.sleep(_RUNNABLE_INTERVAL_S)
    return max(0.0, sum(counts) / len(counts))


def busy_cores() -> tuple[float, str]:
    """Cores' worth of work by other processes, and how it was measured.

    The 1-min load average is the measure; it lags, though, and counts this very process
    when it trained a moment ago (a script running several trainings in turn), so where
    Linux tells how many tasks are runnable right now that count caps it. A core-hogging
    process is always runnable, so it shows in both; this process's past only in the average.
    """
    if not hasattr(os, "getloadavg"):
        return 0.0, "no load average on this OS"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 0.0, "load average unreadable"
    now = runnable_others()
    if now is None:
        return load, f"1-min load {load:.2f}"
    return min(load, now), f"1-min load {load:.2f}, {now:.1f} other tasks runnable now"


def resolve_threads(requested: int, device: torch.device, workers: int, processes: int = 1) -> tuple[int | None, str]:
    """The intra-op thread count for a run, or None to leave torch's default, with the reason.

    Args:
        requested: ``RunConfig.threads``; > 0 is used as it is, 0 means auto, where an
            ``OMP_NUM_THREADS`` in the environment counts as the user's explicit choice.
        device: the run's device; auto leaves CUDA runs at torch's default.
        workers: data-loader worker processes of this process.
        processes: training processes sharing this machine's cores (DDP ranks on it).
    """
    if requested > 0:
        return requested, f"threads = {requested} in the config"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:  # set by the user (or torchrun): torch already follows it
        return None, f"OMP_NUM_THREADS={env} in the environment"
    if device.type != "cpu":
        return None, f"torch's default on {device.type}"
    cores = usable_cores()
    load, how = busy_cores()
    threads = choose_threads(cores, workers, load, processes)
    reason = f"auto: {cores} usable cores - {processes * workers} loader workers - {math.floor(load)} busy ({how})"
    if processes > 1:
        reason += f", shared by {processes} local ranks"
    return threads, reason
