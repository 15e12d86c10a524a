"""The length penalty each quality run's validation prefers, and filling in the grid for
runs that finished before it grew.

Regularisers change output length, so every run is also scored at the lenpen its own
validation BLEU picks from ``LENPENS``. A pick on the grid's edge means the grid did not
bracket the optimum; ``on_edge`` lets the report say so instead of calling it tuned."""

from typing import Callable, Dict

# 0.0 and 0.3 joined on 2026-12-07: every v3 run picked 0.6, then the grid's lowest value
LENPENS = (0.0, 0.3, 0.6, 1.0, 1.4)


def choose(valid_bleu: Dict[float, float]) -> float:
    """The lenpen with the best validation BLEU; a tie keeps 1.0 (fairseq's default), then
    the smaller value."""
    return max(sorted(valid_bleu), key=lambda lp: (valid_bleu[lp], lp == 1.0))


def on_edge(chosen: float, grid=LENPENS) -> bool:
    return chosen in (min(grid), max(grid))


def known(result: dict) -> Dict[float, float]:
    return {float(lp): bleu for lp, bleu in result.get("valid_bleu_by_lenpen", {}).items()}


def missing(result: dict, grid=LENPENS) -> list:
    have = known(result)
    return [lp for lp in grid if lp not in have]


def fill(result: dict, valid_bleu_of: Callable[[float], float], test_score_of: Callable, grid=LENPENS) -> bool:
    """Adds the validation BLEU of the grid's missing lenpens to a finished run's JSON
    (``result``, changed in place) and chooses again; when the choice moves, the test score
    at the new choice (a sacreBLEU score: ``.score``, ``str()``) replaces the old one. Test
    BLEU is decoded only at the chosen lenpen, never used to choose. Returns whether the run
    changed."""
    todo = missing(result, grid)
    if not todo:
        return False
    valid = known(result)
    valid.update({lp: valid_bleu_of(lp) for lp in todo})
    result["valid_bleu_by_lenpen"] = {str(lp): valid[lp] for lp in sorted(valid)}
    chosen = choose(valid)
    if chosen != result.get("lenpen_chosen"):
        score = test_score_of(chosen)
        result.update(lenpen_chosen=chosen, test_sacrebleu_lenpen=score.score, test_sacrebleu_lenpen_text=str(score))
    return True
