"""Issue 19's choices on validation BLEU (benchmarks/weight_choice.py): compared on the seeds
every setting has finished, never on test BLEU, and final only with 2 seeds per setting."""

import pytest

from benchmarks import weight_choice


def run(variant, seed, valid, test=0.0):
    return {"variant": variant, "seed": seed, "best_valid_bleu": valid, "test_sacrebleu": test}


@pytest.mark.fast
def test_the_weight_with_the_best_mean_validation_bleu_on_common_seeds_is_chosen():
    runs = [run("rdrop", 1, 24.5, test=10), run("rdrop", 2, 24.0, test=10), run("rdrop-w1", 1, 22.9, test=30),
            run("rdrop-w1", 2, 23.0, test=30), run("rdrop-w2.5", 1, 24.9), run("rdrop-w2.5", 2, 23.0),
            run("rdrop-w2.5", 3, 40.0)]  # seed 3: only one setting has it, so it is not compared
    c = weight_choice.choose(runs)["rdrop alpha"]
    assert c["seeds"] == [1, 2] and c["chosen"] == "5" and c["variant"] == "rdrop" and c["final"]
    assert c["valid"]["2.5"] == pytest.approx(23.95)


@pytest.mark.fast
def test_a_choice_is_provisional_until_every_setting_has_two_seeds():
    runs = [run("arch", 1, 22.9), run("arch", 2, 22.0), run("arch-w2.5", 1, 23.5), run("arch-w5", 1, 21.0)]
    choice = weight_choice.choose(runs)
    assert choice["arch lambda"]["chosen"] == "2.5" and not choice["arch lambda"]["final"]
    first = choice["arch first refresh epoch"]
    assert first["chosen"] is None and first["runs"] == {"1": 2, "5": 0}
    text = "\n".join(weight_choice.markdown(choice))
    assert "2.5 (arch-w2.5), provisional" in text and "waiting for runs" in text
    assert "rdrop alpha" not in choice, "a family without a finished run is listed"


@pytest.mark.fast
def test_the_best_arch_configuration_is_chosen_on_validation_and_judged_on_test():
    from benchmarks import goals_v3, quality

    runs = [run(v, s, valid, test) for v, s, valid, test in (
        ("none", 1, 20.0, 19.0), ("none", 2, 20.0, 19.5), ("rdrop", 1, 24.0, 21.0), ("rdrop", 2, 24.0, 21.2),
        ("arch", 1, 23.0, 30.0), ("arch", 2, 23.0, 30.0),  # test BLEU must not pick it
        ("arch-w2.5", 1, 24.5, 21.6), ("arch-w2.5", 2, 24.4, 21.82),
        ("arch-w5", 1, 40.0, 10.0))]  # one seed: not a candidate
    test = {}
    for r in runs:
        test.setdefault(r["variant"], {})[r["seed"]] = r["test_sacrebleu"]
    pick = goals_v3.best_arch(runs)
    assert pick["variant"] == "arch-w2.5" and pick["seeds"] == [1, 2] and "arch-w5" not in pick["valid"]
    lines, record = goals_v3.lines(runs, test, {"arch-w2.5": 100.0, "rdrop": 95.0}, quality.paired, quality._diff_text)
    to_rdrop, to_none = record["goals"]
    # +0.61 over rdrop with a CI above 0 (per seed +0.60, +0.62), at 1.05x its cost; +2.46 over none
    assert to_rdrop["met"] == "met" and "cost 1.05x rdrop's" in to_rdrop["measured"]
    assert to_none["met"] == "met"
    _, costly = goals_v3.lines(runs, test, {"arch-w2.5": 120.0, "rdrop": 95.0}, quality.paired, quality._diff_text)
    assert costly["goals"][0]["met"] == "NOT met", "1.26x rdrop's cost passed the 1.1x bound"
    assert record["dropout_share"]["rdrop - none"]["n"] == 2 and "- arch-code - zero-delta: no paired seeds yet" in lines
    # against R-Drop at the alpha its validation chose (here 2.5, test BLEU below alpha 5's), with
    # alpha 5 reported beside
    runs += [run("rdrop-w2.5", 1, 24.6, 20.0), run("rdrop-w2.5", 2, 24.6, 20.0)]
    test["rdrop-w2.5"] = {1: 20.0, 2: 20.0}
    chosen = quality.weight_choice.choose(runs)["rdrop alpha"]["variant"]
    assert chosen == "rdrop-w2.5"
    lines, record = goals_v3.lines(runs, test, {"arch-w2.5": 100.0, "rdrop-w2.5": 95.0}, quality.paired,
                                   quality._diff_text, chosen)
    assert record["goals"][0]["goal"].startswith("best ARCH - rdrop-w2.5 >= +0.3") and record["goals"][0]["met"] == "met"
    assert "cost 1.05x rdrop-w2.5's" in record["goals"][0]["measured"]
    assert record["vs_rdrop_paper_alpha"]["mean"] == pytest.approx(0.61)
    assert any(l.startswith("| best ARCH - rdrop (R-Drop's paper alpha 5, reported) | +0.61") for l in lines)
    # the difference at each run's validation-chosen lenpen is reported beside, the goal judged at lenpen 1
    test_lenpen = {"arch-w2.5": {1: 22.0, 2: 22.0}, "rdrop-w2.5": {1: 21.0, 2: 21.5}, "none": {1: 19.0}}
    lines, record = goals_v3.lines(runs, test, {"arch-w2.5": 100.0, "rdrop-w2.5": 95.0}, quality.paired,
                                   quality._diff_text, chosen, test_lenpen)
    assert record["goals"][0]["met"] == "met"
    assert "; at each run's validation-chosen lenpen: +0.75, 95% CI" in record["goals"][0]["measured"]
    assert "; at each run's validation-chosen lenpen: +3.00 (n=1" in record["goals"][1]["measured"]
    assert not any("validation-chosen lenpen" in l for l in lines if l.startswith("- rdrop - none"))
