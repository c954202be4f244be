"""What a worker measures of memory, to put beside the plan's estimate: its own peak RSS, and the
least memory its node had available while it ran (sampled on a background thread)."""

from __future__ import annotations

import resource
import threading
from typing import Optional

import torch

GB = 1024**3


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NodeMemoryWatch:
    """The minimum of the node's available memory, sampled every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._psutil, self._interval = psutil, interval
        self.min_available = psutil.virtual_memory().available
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-memory-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.min_available = min(self.min_available, self._psutil.virtual_memory().available)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.min_available


def gather_peaks(world: int, node_watch: Optional[NodeMemoryWatch]) -> dict[str, list[float]]:
    """Every rank's peak RSS and its node's least available memory so far, in GB, on every rank (a collective)."""
    mine = torch.tensor([peak_rss_bytes() / GB, (node_watch.min_available if node_watch else 0) / GB], dtype=torch.float64)
    if world > 1:
        everyone = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(everyone, mine)
    else:
        everyone = [mine]
    return {"peak_rss_gb": [round(float(t[0]), 3) for t in everyone],
            "node_min_available_gb": [round(float(t[1]), 3) for t in everyone]}
