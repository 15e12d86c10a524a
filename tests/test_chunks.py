"""``--adv-chunks N`` (fairseq_arch/methods/chunked.py): the perturbed forward and its
backward in N sentence chunks after the early clean backward, for peak memory.

Without dropout it must be the same update as one chunk to float32 rounding (the KL is a
sum over sentences; the order of the gradient's sum differs), through fairseq's Trainer
and under both data-parallel backends, with one all-reduce per update; the peak must
really drop (counted by the cost benchmark's LiveTensorBytes); and it is refused where
there is no early clean backward to build on."""

import pytest
import torch

from fairseq_arch.methods.chunked import chunk_bounds, sentence_slice
from fairseq_arch.perturbation import Teacher

from . import utils
from .test_memory import count_early_calls, ddp_scenarios, largest_batch_peak, run_ranks, trainer_update
from .test_robustness import one_refresh_epoch

GRAD_RTOL = 1e-5  # of each gradient tensor's largest entry: float32 sums in another order
GRAD_ATOL = 1e-9  # the attention keys' bias: its gradient is 0 but for rounding (softmax ignores it)
LOSS_RTOL = 1e-6


@pytest.mark.fast
@pytest.mark.parametrize("sentences,chunks", [(10, 3), (3, 3), (2, 5), (1, 4), (7, 1)])
def test_chunk_bounds_cover_the_batch_without_empty_chunks(sentences, chunks):
    bounds = chunk_bounds(sentences, chunks)
    assert len(bounds) == min(sentences, chunks)
    assert bounds[0][0] == 0 and bounds[-1][1] == sentences
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.fast
def test_a_chunks_teacher_is_the_teacher_of_its_sentences():
    torch.manual_seed(0)
    lprobs = torch.log_softmax(torch.randn(5, 4, 7), -1)  # B x T x V
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    for flat in (False, True):  # get_lprobs_and_target hands the teacher N x V and a flat mask
        whole = Teacher(lprobs.view(-1, 7), mask.view(-1)) if flat else Teacher(lprobs, mask)
        for start, end in [(0, 2), (2, 3), (3, 5), (0, 5)]:
            alone = Teacher(lprobs[start:end], mask[start:end])
            check_chunk_teacher(whole.sentences(start, end, 4), alone, end - start, flat)


def check_chunk_teacher(part, alone, sentences, flat):
    assert part.shape == ((sentences * 4,) if flat else alone.shape) and torch.equal(part.rows, alone.rows)
    assert torch.equal(part.lprobs, alone.lprobs)
    student = torch.log_softmax(torch.randn(sentences, 4, 7), -1)
    assert torch.equal(part.divergence(student), alone.divergence(student))



@pytest.mark.fast
def test_sentence_slice_cuts_the_batch_dimension_only():
    sample = {"id": torch.arange(4), "ntokens": 9, "nsentences": 4, "target": torch.ones(4, 3),
              "alignments": torch.zeros(4, 2),  # 4 alignment pairs, not per sentence: kept whole
              "net_input": {"src_tokens": torch.ones(4, 5), "src_lengths": torch.full((4,), 5), "lang": "de"}}
    part = sentence_slice(sample, 1, 3)
    assert part["id"].tolist() == [1, 2] and part["nsentences"] == 2 and "ntokens" not in part
    assert part["target"].shape == (2, 3) and part["alignments"].shape == (4, 2)
    assert part["net_input"]["src_tokens"].shape == (2, 5) and part["net_input"]["lang"] == "de"
    assert sample["net_input"]["src_tokens"].shape == (4, 5), "the batch itself was changed"


def assert_close_update(a, b):
    (pa, ga, la), (pb, gb, lb) = a, b
    for k in ("loss", "ls_loss", "nll_loss", "adv_loss"):
        assert la[k] == pytest.approx(lb[k], rel=LOSS_RTOL), k
    for n in pa:
        scale = gb[n].abs().max().item()
        assert (ga[n] - gb[n]).abs().max().item() <= GRAD_RTOL * scale + GRAD_ATOL, n
        if scale > 1e-6:  # Adam's g / (|g| + eps) turns a gradient of rounding noise into steps of ~lr
            assert (pa[n] - pb[n]).abs().max().item() <= 1e-6, n  # one Adam step at lr 0.005


@pytest.mark.parametrize("method,reuse,freq,extra", [
    ("arch", False, 1, []), ("arch", True, 2, []), ("smart", False, 1, []),
    ("r3f", False, 1, ["--adv-init-scale", "0.01"]),  # R3F's 1e-5 noise: a KL of 0 without dropout
    ("arch", True, 1, ["--arch-recipe", "code", "--arch-cache-dtype", "float32"])],
    ids=["arch-refresh", "arch-reuse-freq2", "smart", "r3f", "arch-code-reuse"])
def test_chunks_give_the_same_update_without_dropout(small_toy, tmp_path, monkeypatch, method, reuse, freq, extra):
    parts = count_early_calls(monkeypatch, "part")
    chunked = trainer_update(small_toy, tmp_path / "c3", method, True, freq, reuse, extra=["--adv-chunks", "3", *extra])
    assert len(parts) == 2 * freq, f"{len(parts)} chunks backpropagated early, expected 2 per batch"
    whole = trainer_update(small_toy, tmp_path / "c1", method, True, freq, reuse, extra=extra)
    assert len(parts) == 2 * freq, "--adv-chunks 1 ran chunks"
    assert_close_update(chunked, whole)
    assert chunked[2]["adv_loss"] > 0


def test_chunks_lower_the_peak(small_toy, tmp_path):
    """arch on a reuse epoch (every sentence cached), the largest batch: the peak of 4 chunks
    is below one chunk's (the clean CE's gradients stay; the perturbed graph is a quarter)."""
    peak = {}
    for chunks in (1, 4):
        task, model, crit, batches = one_refresh_epoch(small_toy, str(tmp_path / str(chunks)),
                                                       ["--adv-chunks", str(chunks)])
        peak[chunks], log = largest_batch_peak(task, model, crit, batches)
        assert log["arch_cached"] + log["arch_rebuilt"] == log["sentences"]
    ratio = peak[4] / peak[1]
    print(f"arch reuse: peak {peak[1] / 2**20:.2f} MiB in one piece, {peak[4] / 2**20:.2f} MiB in 4 chunks (x{ratio:.3f})")
    assert ratio <= 0.9, f"4 chunks peak at x{ratio:.3f} one chunk's"


@pytest.mark.parametrize("method,extra,match", [
    ("rdrop", [], "not --adv-method rdrop"), ("freelb", [], "not --adv-method freelb"),
    ("arch-rdrop", [], "not --adv-method arch-rdrop"), ("none", [], "not --adv-method none"),
    ("smart", ["--adv-teacher", "grad"], "--adv-teacher grad"), ("arch", ["--adv-chunks", "0"], ">= 1")])
def test_chunks_refused_without_an_early_clean_backward(small_toy, tmp_path, method, extra, match):
    with pytest.raises(ValueError, match=match):
        utils.build_components(small_toy, ["--adv-method", method, "--adv-chunks", "2", *extra],
                               save_dir=str(tmp_path))


def test_chunks_refused_with_a_task_that_has_no_early_clean_backward(small_toy, tmp_path):
    out = utils.run(["fairseq-train", small_toy, "--user-dir", utils.USER_DIR, "--task", "translation",
                     "--criterion", "adversarial_label_smoothed_cross_entropy", "--adv-method", "smart",
                     "--adv-chunks", "2", *utils.TINY_MODEL, "--cpu", "--max-epoch", "1", "--optimizer", "adam",
                     "--lr", "0.005", "--max-tokens", "1000", "--save-dir", str(tmp_path / "ckpt")],
                    capture_output=True, timeout=300)
    text = out.stdout.decode() + out.stderr.decode()
    assert out.returncode != 0 and "--adv-chunks needs --task arch_translation" in text, text[-2000:]


def test_chunks_under_data_parallel_reduce_once(small_toy, tmp_path):
    """2 ranks on gloo, two batches each per update, arch with 2 chunks against 1 chunk:
    as many DDP bucket all-reduces (the chunks but the last run inside no_sync), the same
    gradients to float32 rounding, and both ranks equal (the gradients were reduced)."""
    pairs = []  # (chunked scenario, its one-chunk reference)
    for name, backend, early, skip in ddp_scenarios(("pytorch_ddp", "legacy_ddp"), skip=False):
        if early:
            pairs.append(((f"{name}-c2", backend, early, skip, ["--adv-chunks", "2"]), (name, backend, early, skip, [])))
    res = run_ranks(small_toy, tmp_path, [s for pair in pairs for s in pair])
    for (name, *_), (ref, *_) in pairs:
        for r in range(2):
            a, b = res[(r, name)], res[(r, ref)]
            assert (a["parts"], b["parts"]) == (2, 0), f"{name} rank {r}: {a['parts']} chunks backpropagated early"
            assert a["buckets"] == b["buckets"], f"{name} rank {r}: {a['buckets']} bucket all-reduces, one chunk {b['buckets']}"
            for n in a["grads"]:
                scale = b["grads"][n].abs().max().item()
                assert (a["grads"][n] - b["grads"][n]).abs().max().item() <= GRAD_RTOL * scale + GRAD_ATOL, (name, r, n)
                assert torch.equal(a["grads"][n], res[(1 - r, name)]["grads"][n]), (name, n)
    assert res[(0, pairs[0][0][0])]["buckets"] > 0, "the counting comm hook never ran"


def test_chunks_train_through_the_cli(small_toy, tmp_path):
    """fairseq-train with --adv-chunks 2: a refresh epoch, then a reuse epoch."""
    out = utils.run(["fairseq-train", small_toy, *utils.ARCH_TASK, *utils.TINY_MODEL, "--cpu", "--adv-chunks", "2",
                     "--arch-refresh-interval", "2", "--max-epoch", "2", "--optimizer", "adam", "--lr", "0.005",
                     "--max-tokens", "1000", "--save-dir", str(tmp_path / "ckpt"), "--no-epoch-checkpoints",
                     "--log-format", "simple", "--num-workers", "0"],
                    capture_output=True, timeout=600)
    text = out.stdout.decode() + out.stderr.decode()
    assert out.returncode == 0, text[-3000:]
    assert "ARCH epoch 1: refresh" in text and "ARCH epoch 2: reuse" in text, text[-3000:]
    assert "no early clean backward" not in text, "the chunks fell back to one piece under fairseq-train"
