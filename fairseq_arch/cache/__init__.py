"""ARCH's disk-backed perturbation cache (paper Alg. 1-3, Eq. 2-4).

- :mod:`.arch_cache`: :class:`ArchCache`, the façade the task uses (one per rank).
- :mod:`.lifecycle`: the generation lifecycle at an epoch start (resume rules).
- :mod:`.finalize`: the end of a refresh (fill unwritten rows, means, sizes, neighbours).
- :mod:`.search`: the neighbour search (Eq. 4); :mod:`.epoch_search`: its per-epoch tables.
- :mod:`.sizes`: rebuild sizes (``--arch-rebuild-norm``).
- :mod:`.access`: the per-batch hot path (:class:`RefreshWriter`, :class:`ReuseReader`).
- :mod:`.store`: the files of a cache dir (its docstring lists them), with :mod:`.layout`,
  :mod:`.shards`, :mod:`.epoch_tables`, :mod:`.files` and :mod:`.faults`; :mod:`.lock` (one
  training job per cache dir) and :mod:`.data_digest` (the training tokens' fingerprint).
"""

from .access import RefreshWriter, ReuseReader
from .arch_cache import ArchCache
from .files import CacheCorruptError, CacheIOError, CacheMismatchError
from .lock import CacheInUseError
from .search import load_embedding_matrix
from .store import PerturbationCacheStore

__all__ = ["ArchCache", "CacheCorruptError", "CacheInUseError", "CacheIOError", "CacheMismatchError",
           "PerturbationCacheStore", "RefreshWriter", "ReuseReader", "load_embedding_matrix"]
