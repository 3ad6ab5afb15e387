"""Loader processes ignore SIGUSR1 and SIGTERM.

SLURM signals every process of a job step, loader workers included. A worker killed by SIGUSR1 (the
warning before the time limit) or SIGTERM would take the training process down with "DataLoader worker
exited unexpectedly" before it could save; the training process handles the signal and stops its workers
itself. Workers still exit when the training process dies (PyTorch's worker watchdog).

Importing this module applies it: the loader's forkserver imports it at start (``streams._worker_context``),
so that it survives too. Each worker calls ``ignore_cluster_signals`` again as its init function, because
PyTorch installs its own SIGTERM handler in every worker (one that dies on a SIGTERM not sent by its parent).
"""

import signal


def ignore_cluster_signals(worker_id: int | None = None) -> None:
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


ignore_cluster_signals()
