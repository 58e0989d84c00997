"""Background workers around a patch loader (batchgenerators augmenters).

``autossl_n_proc_DA`` sets the number of worker processes (default ``min(cpu_count, 4)``); 0 runs
the loader in the main process (``SingleThreadedAugmenter``). Memory is pinned only for CUDA.

Workers end with the trainer whatever ends it (``autossl.utilities.lifetime``: the kernel's
parent-death signal on Linux and a parent-pid watch everywhere), so a trainer killed with
SIGKILL leaves none behind. They ignore SIGINT (Ctrl-C reaches the whole process group: the
trainer stops them itself) and keep the default SIGTERM action (not the trainer's handler, which
a forked worker would otherwise inherit).
"""
from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing import Event, Process, Queue
from queue import Queue as ThreadQueue

from batchgenerators.dataloading import nondet_multi_threaded_augmenter as _nondet
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from autossl.utilities.lifetime import exit_with_parent

_PRODUCER_HAS_PAUSE = "pause_event" in inspect.signature(_nondet.producer).parameters


def _worker(parent_pid: int | None, use_prctl: bool, *producer_args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent(parent_pid, use_prctl=use_prctl)
    _nondet.producer(*producer_args)


class ParentBoundAugmenter(NonDetMultiThreadedAugmenter):
    """batchgenerators' ``NonDetMultiThreadedAugmenter`` whose workers end with their parent.

    ``_start`` is the library's, except that each worker runs ``_worker`` around the library's
    ``producer``; shutting down (``_finish``) is the library's."""

    def _start(self):
        if self.initialized:
            return
        self._finish()
        self._queue = Queue(self.num_cached)
        self.results_loop_queue = ThreadQueue(self.num_cached)
        self.abort_event = Event()
        self.pause_event = Event()
        if isinstance(self.generator, DataLoader):
            self.generator.was_initialized = False
        # a worker's parent is this process, except under forkserver (then it is the fork server)
        parent = os.getpid() if multiprocessing.get_start_method() != "forkserver" else None
        # the parent-death signal fires when the starting *thread* ends: only from the main thread
        use_prctl = threading.current_thread() is threading.main_thread()
        for i in range(self.num_processes):
            args = [self._queue, self.generator, self.transform, i, self.seeds[i], self.abort_event]
            if _PRODUCER_HAS_PAUSE:
                args.append(self.pause_event)
            args.append(self.wait_time)
            p = Process(target=_worker, args=(parent, use_prctl, *args), daemon=True)
            self._processes.append(p)
        for p in self._processes:
            p.start()
        try:
            import torch

            gpu = torch.cuda.current_device() if torch.cuda.is_available() else None
        except ImportError:
            gpu = None
        self.results_loop_thread = threading.Thread(
            target=_nondet.results_loop, daemon=True,
            args=(self._queue, self.results_loop_queue, self.abort_event, self.pin_memory, self._processes, gpu,
                  self.wait_time))
        self.results_loop_thread.start()
        self.initialized = True
        logging.debug("started %d loader workers", self.num_processes)


def default_num_workers() -> int:
    env = os.environ.get("autossl_n_proc_DA")
    if env is not None and env.strip() != "":
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"autossl_n_proc_DA must be an integer, got {env!r}") from None
        if n < 0:
            raise ValueError(f"autossl_n_proc_DA must be >= 0, got {n}")
        return n
    return min(os.cpu_count() or 1, 4)


class BatchStream:
    """An endless iterator of batches; ``close()`` stops the workers."""

    def __init__(self, loader, num_workers: int, seeds: list[int] | None = None, pin_memory: bool = False):
        self.loader = loader
        self.num_workers = num_workers
        if num_workers == 0:
            self._it = SingleThreadedAugmenter(loader, None)
        else:
            seeds = list(seeds) if seeds is not None else None
            self._it = ParentBoundAugmenter(loader, None, num_workers, num_cached=max(4, num_workers),
                                                    seeds=seeds, pin_memory=pin_memory, wait_time=0.002)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def close(self) -> None:
        finish = getattr(self._it, "_finish", None)
        if finish is not None:
            finish()
