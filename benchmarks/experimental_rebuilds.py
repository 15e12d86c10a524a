"""Two rebuilds of uncached sentences that ARCH does not train with, measured by the
mechanism probe of ``python -m benchmarks probe`` (``probe_model(..., extra=
ExperimentalRebuilds)``), each sized to eps (like ``rebuilt[eps]``) then projected,
and measured on the uncached sentences like the others:

- ``rebuilt[token-nbr]``: token by token from the nearest cached sentence (the
  generation's neighbour table): the row of the same word when the neighbour has it
  (the mean of its occurrences), else the row of the neighbour's word with the most
  similar embedding (cosine), instead of Eq. 3's one averaged vector on every token;
- ``rebuilt[word-table]``: the mean cached row of each word over all cached sentences
  (a V x C table), Eq. 3's neighbour vector for words no cached sentence has.
"""

from typing import Dict, List, Sequence

import numpy as np
import torch

from fairseq_arch.perturbation import scatter_rows, sentence_norms


def token_aligned_rows(tokens: np.ndarray, nbr_tokens: np.ndarray, nbr_rows: np.ndarray,
                       emb: torch.Tensor) -> np.ndarray:
    """len(tokens) x C rows for a sentence from its neighbour's cached rows (``nbr_rows``,
    one per ``nbr_tokens``): per token, the mean row of the neighbour's occurrences of
    the same word, else the row of the neighbour's word whose embedding (``emb``, V x C')
    is the most cosine-similar."""
    def unit(t):  # only the rows used, not the whole V x C' matrix
        return torch.nn.functional.normalize(emb[torch.as_tensor(t, device=emb.device)].float().cpu(), dim=-1)

    sim = unit(tokens) @ unit(nbr_tokens).T  # n x m
    pick = sim.argmax(dim=1).numpy()
    out = nbr_rows[pick].copy()
    for j, w in enumerate(tokens):
        same = nbr_tokens == w
        if same.any():
            out[j] = nbr_rows[same].mean(axis=0)
    return out


def word_table(token_lists: Sequence[np.ndarray], row_lists: Sequence[np.ndarray]) -> Dict[int, np.ndarray]:
    """{word id: mean row} over every occurrence in the given sentences (tokens and
    their rows, one row per token)."""
    sums: Dict[int, np.ndarray] = {}
    counts: Dict[int, int] = {}
    for toks, rows in zip(token_lists, row_lists):
        assert len(toks) == len(rows), f"{len(toks)} tokens but {len(rows)} rows"
        for w, r in zip(toks.tolist(), rows):
            if w in sums:
                sums[w] += r
                counts[w] += 1
            else:
                sums[w] = r.astype(np.float64)
                counts[w] = 1
    return {w: (sums[w] / counts[w]).astype(np.float32) for w in sums}


def row_tokens(reader, side: str, ids: np.ndarray) -> List[np.ndarray]:
    """Per sentence, the token each cached row belongs to: the source tokens; for the
    target, the decoder input (eos, then the target without its final eos)."""
    flat, off = reader.sentence_tokens(side, np.asarray(ids, dtype=np.int64))
    toks = [flat[off[i]: off[i + 1]] for i in range(len(ids))]
    if side == "target":
        eos = reader.dicts["target"].eos()
        toks = [np.concatenate([[eos], t[:-1]]).astype(np.int64) for t in toks]
    return toks


class ExperimentalRebuilds:
    """``rebuilt[token-nbr]`` and ``rebuilt[word-table]`` (module docstring) from a cache
    reader (``ArchCache.open_reader()``)."""

    def __init__(self, reader, model):
        self.reader, self.model = reader, model
        self.tables: Dict[str, Dict[int, np.ndarray]] = {}

    def _table(self, side: str) -> Dict[int, np.ndarray]:
        if side not in self.tables:
            store = self.reader.store
            pos = np.arange(store.num_cached)
            rows = self.reader.read_rows(side, pos)
            self.tables[side] = word_table(row_tokens(self.reader, side, store.cached_ids[pos]), rows)
        return self.tables[side]

    def deltas(self, ids, side: str, mask: torch.Tensor, eps: float, project) -> Dict[str, torch.Tensor]:
        reader, store = self.reader, self.reader.store
        ids = np.asarray(ids, dtype=np.int64)
        emb = reader.embedding_matrix(side, self.model)
        toks = row_tokens(reader, side, ids)
        table = self._table(side)
        # cached sentences are measured as `cached`, not as rebuilds: zero rows here
        out = {k: [np.zeros((len(t), store.dims[side]), dtype=np.float32) for t in toks]
               for k in ("token-nbr", "word-table")}
        uncached = np.nonzero(store.pos_of[ids] < 0)[0]
        nbr = np.asarray(reader.neighbors[side][ids[uncached], 0], dtype=np.int64)  # nearest cached position each
        # the batch's neighbours in one read each (rows, tokens)
        nbr_rows = reader.read_rows(side, nbr)
        nbr_toks = row_tokens(reader, side, store.cached_ids[nbr])
        for j, b in enumerate(uncached):
            out["token-nbr"][b] = token_aligned_rows(toks[b], nbr_toks[j], nbr_rows[j], emb)
            mean = np.asarray(reader.means[side][nbr[j]], dtype=np.float32)
            out["word-table"][b] = np.stack([table.get(int(w), mean) for w in toks[b]])
        res = {}
        for k, rows in out.items():
            delta = scatter_rows(rows, mask)
            norms = sentence_norms(delta, mask).clamp_min(1e-12)
            res[k] = project(delta * (eps / norms).view(-1, 1, 1), mask)
        return res
