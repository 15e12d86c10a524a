"""The per-side "row written by a batch" flags of a generation being written
(``<side>.written``: one byte per cached sentence). Rank 0 sets them when it merges the
shards; finalisation reads them to find the rows no batch wrote, then removes them (a
complete generation is read-only; not a .bin/.npy, so not part of its checksums)."""

import os
from typing import Callable, Dict

import numpy as np

from .files import check_size

WRITTEN = ".written"


class WriteFlags:
    def __init__(self, gen_dir: Callable[[str], str], num_cached: Callable[[], int]):
        self._gen_dir = gen_dir
        self._num_cached = num_cached
        self._maps: Dict[str, np.memmap] = {}  # "<generation>/<side>" -> writable map

    def path(self, name: str, side: str) -> str:
        return os.path.join(self._gen_dir(name), f"{side}{WRITTEN}")

    def create(self, directory: str, side: str) -> None:
        """All unwritten, in a generation directory being made."""
        with open(os.path.join(directory, f"{side}{WRITTEN}"), "wb") as f:
            f.write(bytes(self._num_cached()))

    def _map(self, name: str, side: str) -> np.memmap:
        key = f"{name}/{side}"
        if key not in self._maps:
            path, m = self.path(name, side), self._num_cached()
            check_size(path, m)
            self._maps[key] = np.memmap(path, dtype=np.uint8, mode="r+", shape=(m,))
        return self._maps[key]

    def mark(self, name: str, side: str, written: np.ndarray) -> None:
        """Set the flags of the positions ``written`` (M bools) and make them durable."""
        if written.any():
            flags = self._map(name, side)
            flags[written] = 1
            flags.flush()

    def read(self, name: str, side: str) -> np.ndarray:
        """M bools: which cached rows a batch wrote, as of the last merge of the shards."""
        return np.asarray(self._map(name, side)) != 0

    def remove(self, name: str, sides) -> None:
        for side in sides:
            self._maps.pop(f"{name}/{side}", None)
            if os.path.exists(self.path(name, side)):
                os.remove(self.path(name, side))

    def close(self) -> None:
        for m in self._maps.values():
            m.flush()
        self._maps = {}
