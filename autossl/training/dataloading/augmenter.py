"""Background workers around a patch loader (batchgenerators augmenters).

``autossl_n_proc_DA`` sets the number of worker processes (default ``min(cpu_count, 4)``); 0 runs
the loader in the main process (``SingleThreadedAugmenter``). Memory is pinned only for CUDA.
"""
from __future__ import annotations

import os

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter


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
            self._it = NonDetMultiThreadedAugmenter(loader, None, num_workers, num_cached=max(4, num_workers),
                                                    seeds=seeds, pin_memory=pin_memory, wait_time=0.002)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def close(self) -> None:
        finish = getattr(self._it, "_finish", None)
        if finish is not None:
            finish()
