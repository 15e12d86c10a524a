"""The neighbour search (paper Eq. 4): each uncached sentence's K nearest cached ones by
cosine of mean word embeddings (or random ones, R-1-NN), and the embedding matrices
it reads (the model's, or a fixed ``--arch-neighbor-embeddings`` file)."""

import logging
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .. import cache_math
from ..neighbors import CosineIndex, degenerate_neighbours
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)

# sentences per chunk of the neighbour search: bounds memory at chunk x C floats
NEIGHBOR_CHUNK = 32768


# what --arch-neighbor-embeddings accepts besides 'model' and 'random' (said in every refusal)
EMBEDDING_FORMATS = ("a fairseq checkpoint (its encoder/decoder embed_tokens), a .npy V x C float matrix "
                     "(numpy.save), or a .pt tensor / dict with 'source' and 'target' tensors (torch.save)")


def load_embedding_matrix(path: str) -> Dict[str, torch.Tensor]:
    """Word-embedding matrices for Eq. 4 from a file: a fairseq checkpoint (its
    encoder/decoder ``embed_tokens``), a ``.npy`` matrix, or a ``.pt`` tensor or dict
    with ``source``/``target`` tensors. Returns ``{"source": W, "target": W}``; a file
    of another format or with non-finite entries is refused, naming the option."""
    w = _read_embedding_file(path)
    for side, m in w.items():
        bad = int((~torch.isfinite(m)).sum())
        if bad:
            raise ValueError(
                f"--arch-neighbor-embeddings {path}: the {side} matrix has {bad} non-finite (nan or inf) "
                f"entries of {m.numel()}: the neighbour search would give every sentence the same neighbour. "
                "Use a matrix of finite values (or --arch-neighbor-embeddings model)")
    return w


def _read_embedding_file(path: str) -> Dict[str, torch.Tensor]:
    def refuse(why: str):
        return ValueError(f"--arch-neighbor-embeddings {path}: {why}; accepted formats: {EMBEDDING_FORMATS}")

    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)  # a matrix: never unpickle objects
        except (ValueError, OSError, EOFError) as e:
            raise refuse(f"not a numeric .npy matrix ({type(e).__name__}: {e})") from e
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise refuse(f"a .npy array of dtype {arr.dtype}, not numbers")
        w = torch.from_numpy(arr).float()
        return {"source": w, "target": w}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError, ...: all "not this format")
        raise refuse(f"cannot be read by torch.load ({type(e).__name__}: {e})") from e
    if torch.is_tensor(obj):
        return {"source": obj.float(), "target": obj.float()}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
        keys = {"source": "encoder.embed_tokens.weight", "target": "decoder.embed_tokens.weight"}
        missing = [k for k in keys.values() if k not in sd]
        if missing:
            raise ValueError(f"--arch-neighbor-embeddings {path}: checkpoint has no {missing}")
        return {s: sd[k].float() for s, k in keys.items()}
    if isinstance(obj, dict) and "source" in obj and "target" in obj:
        try:
            return {s: torch.as_tensor(obj[s]).float() for s in ("source", "target")}
        except (TypeError, ValueError, RuntimeError) as e:
            raise refuse(f"its 'source' / 'target' are not numeric tensors ({e})") from e
    raise refuse(f"a {type(obj).__name__} of none of these formats")


class NeighborSearch:
    """Nearest cached sentences of a cache's store, from a dataset's tokens."""

    def __init__(self, store: PerturbationCacheStore, dataset, dicts: Dict[str, object], *, num_neighbors: int,
                 neighbor_embeddings: str, fixed_embeddings: Optional[Dict[str, torch.Tensor]], seed: int):
        self.store = store
        self.dataset = dataset
        self.dicts = dicts
        self.num_neighbors, self.seed = num_neighbors, seed
        # "random" (R-1-NN), or the embeddings Eq. 4 averages: the model's, or a fixed file's
        self.neighbor_embeddings, self.fixed_embeddings = neighbor_embeddings, fixed_embeddings
        self.last_backend = ""  # the search backend of the last search ("random" for R-1-NN)

    def embedding_matrix(self, side: str, model) -> torch.Tensor:
        """V x C' word embeddings of ``side``: the fixed file's (on the model's device), or
        the model's own."""
        if self.fixed_embeddings is not None:
            w = self.fixed_embeddings[side]
            return w if model is None else w.to(next(model.parameters()).device)
        from ..injection import embedding_modules

        return embedding_modules(model)[side].weight.detach()

    def sentence_tokens(self, side: str, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(flat token ids, offsets: len(ids) + 1) of the dataset sentences ``ids``."""
        ds = self.dataset.src if side == "source" else self.dataset.tgt
        toks = [np.asarray(ds[int(i)], dtype=np.int64) for i in ids]
        lengths = np.array([len(t) for t in toks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
        return flat, offsets

    def sentence_vectors(self, side: str, ids: np.ndarray, w: torch.Tensor) -> torch.Tensor:
        """Eq. 4: len(ids) x C' mean word embeddings (pad, eos, bos left out)."""
        d = self.dicts[side]
        flat, offsets = self.sentence_tokens(side, ids)
        return cache_math.sentence_vectors(flat, offsets, w, ignore=(d.pad(), d.eos(), d.bos()))

    def compute_neighbors(self, side: str, model, epoch: int,
                          db_positions: Optional[np.ndarray] = None) -> np.ndarray:
        """N x K int32 table: for every uncached sentence, the cached positions of its
        K nearest neighbours (cosine of mean word embeddings); -1 for cached ones.
        Neighbours are drawn from ``db_positions`` (cached positions; default all)."""
        store = self.store
        k = self.num_neighbors
        nbr = np.full((store.n_sentences, k), -1, dtype=np.int32)
        uncached = np.nonzero(store.pos_of < 0)[0]
        if len(uncached) == 0:
            return nbr
        nbr[uncached] = self.nearest_cached(side, model, epoch, uncached, db_positions, k, salt=0)
        if self.neighbor_embeddings != "random":  # R-1-NN draws uniformly: nothing to check
            warning = degenerate_neighbours(nbr[uncached, 0], len(db_positions) if db_positions is not None
                                            else store.num_cached, side)
            if warning:
                logger.warning(warning)
        return nbr

    def nearest_cached(self, side: str, model, epoch: int, queries_ids: np.ndarray,
                       db_positions: Optional[np.ndarray], k: int, salt: int) -> np.ndarray:
        """len(queries_ids) x k cached positions (among ``db_positions``, default all):
        the nearest by cosine of mean word embeddings, or random ones (R-1-NN)."""
        store = self.store
        if db_positions is None:
            db_positions = np.arange(store.num_cached)
        out = np.zeros((len(queries_ids), k), dtype=np.int32)
        if self.neighbor_embeddings == "random":
            side_id = 0 if side == "source" else 1
            rng = np.random.default_rng([self.seed, epoch, side_id, 0x5EED + salt])
            out[:] = db_positions[rng.integers(0, len(db_positions), size=(len(queries_ids), k))]
            self.last_backend = "random"
            return out
        w = self.embedding_matrix(side, model)
        db = self.sentence_vectors(side, store.cached_ids[db_positions], w)
        index = CosineIndex(db, device=w.device)
        self.last_backend = index.backend
        for start in range(0, len(queries_ids), NEIGHBOR_CHUNK):
            chunk = queries_ids[start: start + NEIGHBOR_CHUNK]
            # identical sentence vectors (repeated sentences, common in crawled or
            # Tatoeba-like corpora) have identical neighbours: search each once
            queries, inverse = torch.unique(self.sentence_vectors(side, chunk, w), dim=0, return_inverse=True)
            _, idx = index.search(queries, k)
            out[start: start + len(chunk)] = db_positions[idx[inverse.cpu()].numpy()]
        return out
