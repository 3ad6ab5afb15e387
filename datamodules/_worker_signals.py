"""Loader processes ignore SIGUSR1.

SLURM sends SIGUSR1 (the warning before the time limit) to every process of a job step, loader workers
included, and its default action kills the process: the training process would then die with "DataLoader
worker exited unexpectedly" before it could save and requeue. The training process handles the signal
itself and stops its workers.

SIGTERM keeps PyTorch's worker handler: the training process stops workers with SIGTERM when they do not
exit by themselves, and so does multiprocessing at interpreter exit, so ignoring it would hang the exit.

Importing this module applies it: the loader's forkserver imports it at start (``streams._worker_context``)
and each worker calls ``ignore_cluster_signals`` as its init function.
"""

import signal


def ignore_cluster_signals(worker_id: int | None = None) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


ignore_cluster_signals()
