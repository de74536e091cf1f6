"""DataLoader worker processes under a scheduler: they outlive no trainer and are stopped only by it.

Schedulers (Slurm and most others) send SIGTERM to the whole process group before they kill it, and Ctrl-C sends
SIGINT to the group. A worker killed by either would take the trainer's data stream down before the trainer could
save, so workers ignore both: the trainer decides when to stop, and its workers end with it. Three rules make
that hold at every moment of a worker's life:

- `holding_stop_signals()` around the start of the workers: a worker is forked with SIGINT/SIGTERM blocked, so a
  signal that reaches it before `init_worker` ran stays pending (torch's own worker handler would otherwise kill
  it), and `init_worker` then discards it. The trainer gets its copy when the hold ends.
- SIGTERM from the worker's parent still ends it: that is how torch and multiprocessing stop workers (at shutdown,
  and at interpreter exit while a worker is still running). A worker that ignored it too would hang that exit.
- `die_with_parent`: the kernel kills the worker when the trainer dies without stopping it (kill -9, out of
  memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
import threading

import numpy as np
import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Workers are forked so that the blocked signals and the parent pid hold. Python 3.14 makes forkserver the Linux
# default; its workers would be children of the server instead. Elsewhere (macOS, Windows) keep the default, spawn.
START_METHOD = "fork" if sys.platform.startswith("linux") else None


@contextlib.contextmanager
def holding_stop_signals(spawning: bool = False):
    """Block SIGINT/SIGTERM in this thread (and so in the processes it starts) for the duration.

    `spawning`: processes start by spawn or forkserver. The first such start also starts multiprocessing's
    resource tracker, and CPython unblocks both signals in this thread once the tracker is up, midway through
    the hold; starting the tracker first keeps the hold whole."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    if spawning:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send this process `sig` (SIGKILL) when its parent dies.

    A worker blocked writing a batch to a full pipe never notices that the trainer was killed (kill -9,
    out of memory) and would live on, holding memory; the death signal ends it. The kernel sends it when
    the parent *thread* that started the worker exits, which for a loader iterated by the training loop
    is the main thread. Elsewhere (macOS, Windows) this does nothing: those workers are spawned and exit
    when their pipe to the parent breaks.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (e.g. another libc): keep the old behaviour
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed: nobody would send it
        os.kill(os.getpid(), sig)


def _exit_on_sigterm_from(parent_pid: int) -> None:
    """SIGTERM stays blocked; a thread takes each one and exits only when the parent sent it."""
    def watch():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
                os._exit(0)  # what torch's worker handler does for its parent's SIGTERM

    threading.Thread(target=watch, name="limoe-sigterm", daemon=True).start()


def init_worker(parent_pid: int, worker_id: int) -> None:
    """Each DataLoader worker: die with the parent, leave the group's SIGINT/SIGTERM to it, and seed Python and
    NumPy from torch's per-worker seed (itself from the loader's generator), so any user transform that uses
    `random` or NumPy is reproducible too."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards one that is pending
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # blocked already when forked under the hold
        _exit_on_sigterm_from(parent_pid)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
