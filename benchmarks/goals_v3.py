"""Issue 19's goals, judged in the v3 report (benchmarks/quality.py adds these lines).

- The best ARCH configuration, chosen on validation BLEU only: the ARCH variant (``ARCH_FAMILY``)
  with the highest mean best-valid BLEU over the seeds every candidate has finished, among the
  candidates with at least ``weight_choice.MIN_SEEDS`` seeds. It must beat R-Drop by >= +0.3
  test sacreBLEU (mean paired difference, 95% CI above 0) at no more than 1.1x R-Drop's
  cost-derived wall-clock, and beat ``none`` by >= +1.0 (CI above 0). R-Drop is the one at the
  alpha the validation chose from the same grid (every regulariser gets the same tuning); the
  difference to R-Drop's paper alpha (5, ``rdrop``) is reported beside it.
- The dropout share: arch-code, zero-delta and rdrop each minus none, and arch-code minus
  zero-delta (what the code recipe's perturbation adds to its dropout-consistency term).
"""

from typing import Callable, Dict, List, Optional

from .weight_choice import MIN_SEEDS

ARCH_FAMILY = ("arch", "arch-w2.5", "arch-w5", "arch-first5", "arch-code", "arch-rdrop", "arch-rdrop-w1",
               "arch-rdrop-w2.5")
DROPOUT_SHARE = (("arch-code", "none"), ("zero-delta", "none"), ("rdrop", "none"), ("arch-code", "zero-delta"))


def best_arch(results: List[dict]) -> Dict[str, object]:
    """{"variant": the validation's pick or None, "valid": {variant: mean best valid BLEU on the
    common seeds}, "seeds": those seeds}."""
    valid: Dict[str, Dict[int, float]] = {}
    for r in results:
        if r["variant"] in ARCH_FAMILY:
            valid.setdefault(r["variant"], {})[r["seed"]] = r["best_valid_bleu"]
    candidates = {v: s for v, s in valid.items() if len(s) >= MIN_SEEDS}
    if not candidates:
        return {"variant": None, "valid": {}, "seeds": []}
    seeds = sorted(set.intersection(*(set(s) for s in candidates.values())))
    means = {v: sum(s[k] for k in seeds) / len(seeds) for v, s in candidates.items()} if seeds else {}
    return {"variant": max(means, key=means.get) if means else None, "valid": means, "seeds": seeds}


def lines(results: List[dict], test: Dict[str, Dict[int, float]], seconds: Dict[str, Optional[float]],
          paired: Callable, diff_text: Callable, rdrop: str = "rdrop",
          test_lenpen: Optional[Dict[str, Dict[int, float]]] = None) -> (List[str], dict):
    """Markdown lines and the JSON record of the goals; ``test``: {variant: {seed: test BLEU}},
    ``seconds``: each variant's cost-derived wall-clock per run, ``paired``/``diff_text``: the
    report's paired difference and its text; ``rdrop``: the R-Drop variant the validation chose;
    ``test_lenpen``: the test BLEU at each run's validation-chosen lenpen, whose difference is
    reported beside each one (the goals are judged at lenpen 1)."""
    pick = best_arch(results)
    best = pick["variant"]
    out = ["Issue 19's goals (the best ARCH configuration chosen on validation BLEU only, among the ARCH variants "
           f"with {MIN_SEEDS}+ seeds: " + (f"**{best}**, mean valid BLEU on seeds {','.join(map(str, pick['seeds']))}: "
                                              + ", ".join(f"{v} {m:.2f}" for v, m in sorted(pick["valid"].items()))
                                              if best else "none yet") + "):", "",
           "| goal | measured | met |", "|---|---|---|"]
    record = {"best_arch": pick, "goals": [], "dropout_share": {}}
    test_lenpen = test_lenpen or {}

    def at_lenpen(a, b):
        p = paired(test_lenpen.get(a, {}), test_lenpen.get(b, {}))
        return f"; at each run's validation-chosen lenpen: {diff_text(p)}" if p["n"] else ""

    def goal(text, p, other, threshold, extra_ok=True, note=""):
        if best is None or not p or not p["n"]:
            state, value = "not measured", "n/a"
        else:
            ok = p["mean"] >= threshold and p["ci"] is not None and p["ci"][0] > 0 and extra_ok
            state = ("met" if ok else "NOT met") + (" (n=1: no CI)" if p["ci"] is None else "")
            value = diff_text(p) + note + at_lenpen(best, other)
        record["goals"].append({"goal": text, "measured": value, "met": state})
        out.append(f"| {text} | {value} | {state} |")

    for other, threshold in ((rdrop, 0.3), ("none", 1.0)):
        p = paired(test.get(best, {}), test.get(other, {})) if best else None
        extra_ok, note = True, ""
        if other == rdrop and best:
            a, r = seconds.get(best), seconds.get(rdrop)
            extra_ok = a is not None and r is not None and a <= 1.1 * r
            note = f"; cost {a / r:.2f}x {rdrop}'s" if a is not None and r else "; cost not measured"
        text = f"best ARCH - {other} >= {threshold:+.1f} sacreBLEU, 95% CI above 0" + (
            f", at <= 1.1x its cost ({other}: R-Drop at the validation's alpha)" if other == rdrop else "")
        goal(text, p, other, threshold, extra_ok, note)
    if best and rdrop != "rdrop":
        p = paired(test.get(best, {}), test.get("rdrop", {}))
        record["vs_rdrop_paper_alpha"] = p
        out.append(f"| best ARCH - rdrop (R-Drop's paper alpha 5, reported) | "
                   f"{diff_text(p) + at_lenpen(best, 'rdrop') if p['n'] else 'n/a'} | (no goal) |")
    out += ["", "Dropout share (reported, no goal): how much of the official recipe's gain is dropout consistency "
            "(zero-delta: the same two dropout passes and KL with delta = 0):", ""]
    for a, b in DROPOUT_SHARE:
        p = paired(test.get(a, {}), test.get(b, {}))
        record["dropout_share"][f"{a} - {b}"] = p
        out.append(f"- {a} - {b}: {diff_text(p)}{at_lenpen(a, b)}")
    return out + [""], record
