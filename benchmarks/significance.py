"""sacreBLEU's paired bootstrap resampling (``sacrebleu --paired-bs``), seed by seed.

The paired t interval of the quality report says whether a difference between variants
holds across seeds (training noise). The bootstrap says, for one seed, whether it holds
across test sentences (test-set noise). Both are reported: a difference can be
significant on the test set of every seed and still vanish across seeds.

Reads the test hypotheses each run keeps beside its JSON (``<variant>-s<seed>.test.hyp``,
lenpen 1, the hypotheses behind ``test_sacrebleu``).
"""

import os
from typing import Dict, List, Optional, Sequence

BOOTSTRAP_SAMPLES = 1000  # sacreBLEU's default for --paired-bs
BOOTSTRAP_SEED = 12345  # sacreBLEU's default (SACREBLEU_SEED)


def hyp_path(suite_dir: str, variant: str, seed: int) -> str:
    return os.path.join(suite_dir, f"{variant}-s{seed}.test.hyp")


def read_hyps(path: str) -> Optional[List[str]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def paired_bootstrap(baseline: Sequence[str], system: Sequence[str], refs: Sequence[str],
                     n_samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """sacreBLEU's paired bootstrap of ``system`` against ``baseline`` on the same ``refs``:
    both BLEUs, the difference, the system's 95% bootstrap interval and sacreBLEU's p-value
    of the null hypothesis that the two systems are equally good (it compares the size of
    the resampled differences, so it is the same whichever system is first)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if not (len(baseline) == len(system) == len(refs)):
        raise ValueError(f"paired bootstrap needs equal lengths: baseline {len(baseline)}, "
                         f"system {len(system)}, references {len(refs)}")
    if list(baseline) == list(system):
        # sacreBLEU's test gives identical outputs p = 1/(n+1) (no resample differs by more
        # than the observed 0); there is nothing to test
        score = BLEU(force=True).corpus_score(list(system), [list(refs)]).score
        return {"baseline": score, "system": score, "delta": 0.0, "system_ci": [score, score], "p_value": 1.0}
    os.environ.setdefault("SACREBLEU_SEED", str(BOOTSTRAP_SEED))
    test = PairedTest([("baseline", list(baseline)), ("system", list(system))], {"BLEU": BLEU(force=True)},
                      [list(refs)], test_type="bs", n_samples=n_samples)
    _, scores = test()
    base, res = scores["BLEU"][0], scores["BLEU"][1]
    return {"baseline": float(base.score), "system": float(res.score), "delta": float(res.score - base.score),
            "system_ci": [float(res.mean - res.ci), float(res.mean + res.ci)], "p_value": float(res.p_value)}


def seed_table(suite_dir: str, pairs: Sequence[tuple], seeds: Sequence[int], refs: Sequence[str]) -> Dict[str, dict]:
    """{"a - b": {seed: paired_bootstrap(b's hyps, a's hyps)}} for every pair and seed whose
    two hypothesis files exist."""
    out: Dict[str, dict] = {}
    for a, b in pairs:
        row = {}
        for s in seeds:
            ha, hb = read_hyps(hyp_path(suite_dir, a, s)), read_hyps(hyp_path(suite_dir, b, s))
            if ha is not None and hb is not None:
                row[s] = paired_bootstrap(hb, ha, refs)
        if row:
            out[f"{a} - {b}"] = row
    return out


def markdown(table: Dict[str, dict]) -> List[str]:
    """One line per pair: the per-seed difference and its p-value (* below 0.05)."""
    if not table:
        return ["Paired bootstrap (sacreBLEU --paired-bs): no pair of runs with kept test hypotheses yet.", ""]
    lines = [f"Paired bootstrap per seed (sacreBLEU --paired-bs, {BOOTSTRAP_SAMPLES} resamples of the test "
             "sentences; p: sacreBLEU's p-value for 'the two are equally good' on that seed's test set; "
             "* p < 0.05):", ""]
    for pair, row in table.items():
        cells = [f"s{s}: {r['delta']:+.2f} (p={r['p_value']:.3f}{'*' if r['p_value'] < 0.05 else ''})"
                 for s, r in sorted(row.items())]
        lines.append(f"- {pair}: " + "; ".join(cells))
    lines.append("")
    return lines
