"""The validation-chosen length penalty of the quality benchmark, and filling in a grid that
grew after a run finished (benchmarks/lenpen_choice.py), without fairseq."""

import pytest

from benchmarks import lenpen_choice

pytestmark = pytest.mark.fast


def test_choice_is_the_best_validation_bleu_and_a_tie_keeps_fairseqs_default():
    assert lenpen_choice.choose({0.6: 20.0, 1.0: 21.0, 1.4: 20.5}) == 1.0
    assert lenpen_choice.choose({0.3: 21.2, 0.6: 21.0, 1.0: 20.0}) == 0.3
    assert lenpen_choice.choose({0.6: 21.0, 1.0: 21.0}) == 1.0
    assert lenpen_choice.choose({0.3: 21.0, 0.6: 21.0}) == 0.3
    assert lenpen_choice.on_edge(0.0) and lenpen_choice.on_edge(1.4) and not lenpen_choice.on_edge(0.6)
    assert lenpen_choice.on_edge(0.6, (0.6, 1.0, 1.4))


class Score:  # what sacreBLEU's corpus_score returns, as far as fill reads it
    score = 19.9

    def __str__(self):
        return "BLEU = 19.90"


def old_run():
    return {"valid_bleu_by_lenpen": {"0.6": 21.0, "1.0": 20.5, "1.4": 20.0}, "lenpen_chosen": 0.6,
            "test_sacrebleu_lenpen": 19.5, "test_sacrebleu_lenpen_text": "BLEU = 19.50"}


def test_fill_decodes_only_the_missing_lenpens_and_test_only_at_a_new_choice():
    valid_asked, test_asked = [], []

    def valid(lp):
        valid_asked.append(lp)
        return {0.0: 20.0, 0.3: 21.4}[lp]

    def test(lp):
        test_asked.append(lp)
        return Score()

    r = old_run()
    assert lenpen_choice.missing(r) == [0.0, 0.3]
    assert lenpen_choice.fill(r, valid, test)
    assert valid_asked == [0.0, 0.3] and test_asked == [0.3]
    assert r["valid_bleu_by_lenpen"] == {"0.0": 20.0, "0.3": 21.4, "0.6": 21.0, "1.0": 20.5, "1.4": 20.0}
    assert (r["lenpen_chosen"], r["test_sacrebleu_lenpen"], r["test_sacrebleu_lenpen_text"]) == (0.3, 19.9, "BLEU = 19.90")
    assert not lenpen_choice.fill(r, valid, test)  # complete: nothing decoded again
    assert valid_asked == [0.0, 0.3]


def test_fill_keeps_the_test_score_when_the_choice_does_not_move():
    r = old_run()
    assert lenpen_choice.fill(r, lambda lp: 15.0, lambda lp: pytest.fail("test decoded although 0.6 stays"))
    assert (r["lenpen_chosen"], r["test_sacrebleu_lenpen"]) == (0.6, 19.5)
