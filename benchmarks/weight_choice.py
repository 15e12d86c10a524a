"""Issue 19's choices made on validation BLEU only: each regulariser's weight from the grid
{1, 2.5, 5}, and ARCH's first refresh epoch (1 or 5).

A family's variants that have finished runs are compared on the seeds that all of them
have, by the mean of each run's best validation BLEU (greedy, the checkpoint the run
keeps). Test BLEU is never read here. A choice is "provisional" while a setting is missing
or has fewer than ``MIN_SEEDS`` seeds, and "final" after.
"""

from typing import Dict, List

MIN_SEEDS = 2
# family -> {setting shown: variant name}
FAMILIES = {
    "arch lambda": {"1": "arch", "2.5": "arch-w2.5", "5": "arch-w5"},
    "rdrop alpha": {"1": "rdrop-w1", "2.5": "rdrop-w2.5", "5": "rdrop"},
    "arch-rdrop alpha": {"1": "arch-rdrop-w1", "2.5": "arch-rdrop-w2.5", "5": "arch-rdrop"},
    "arch first refresh epoch": {"1": "arch", "5": "arch-first5"},
}


def choose(results: List[dict]) -> Dict[str, dict]:
    """{family: {"valid": {setting: mean best valid BLEU on the common seeds}, "seeds": [...],
    "chosen": setting or None, "variant": its name, "final": bool}} for the families with a
    finished run."""
    valid = {}
    for r in results:
        valid.setdefault(r["variant"], {})[r["seed"]] = r["best_valid_bleu"]
    out = {}
    for family, settings in FAMILIES.items():
        have = {s: valid.get(v, {}) for s, v in settings.items()}
        if not any(have.values()):
            continue
        # the settings with a finished run, on the seeds all of those have (a choice needs two)
        ran = [s for s in settings if have[s]]
        common = sorted(set.intersection(*(set(have[s]) for s in ran))) if len(ran) > 1 else []
        means = {s: sum(have[s][k] for k in common) / len(common) for s in ran} if common else {}
        chosen = max(means, key=means.get) if means else None
        out[family] = {"valid": means, "seeds": common, "chosen": chosen,
                       "variant": settings[chosen] if chosen else None,
                       "runs": {s: len(seeds) for s, seeds in have.items()},
                       "final": bool(means) and all(len(seeds) >= MIN_SEEDS for seeds in have.values())}
    return out


def markdown(choice: Dict[str, dict]) -> List[str]:
    if not choice:
        return []
    lines = ["Choices on validation BLEU only (the settings with finished runs, by their mean best valid BLEU on the "
             f"seeds all of them have; provisional until every setting has {MIN_SEEDS} seeds):", "",
             "| choice | setting: mean valid BLEU (runs finished) | common seeds | chosen |", "|---|---|---|---|"]
    for family, c in choice.items():
        cells = ", ".join(f"{s}: {c['valid'][s]:.2f} ({c['runs'][s]})" if s in c["valid"] else f"{s}: - ({c['runs'][s]})"
                          for s in FAMILIES[family])
        chosen = f"{c['chosen']} ({c['variant']})" if c["chosen"] else "-"
        state = "final" if c["final"] else "provisional" if c["chosen"] else "waiting for runs"
        lines.append(f"| {family} | {cells} | {', '.join(map(str, c['seeds'])) or '-'} | {chosen}, {state} |")
    return lines + [""]
