"""``--arch lstm``: fairseq's LSTM encoder moves the left padding of ``src_tokens`` to
the right before its embedding lookup, so the injection hook sees another tensor than
``src_tokens``. The perturbation must still reach every source token (its own row,
moved with it), through the criterion on padded batches, in every method."""

import os

import pytest
import torch

from fairseq_arch.injection import perturbed_embeddings, check_applied

from . import utils

TINY_LSTM = [
    "--arch", "lstm", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--encoder-hidden-size", "16",
    "--decoder-embed-dim", "16", "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16",
]


def build_lstm(data_dir, save_dir, extra=()):
    """(task, model, criterion) as fairseq-train builds them for a tiny LSTM
    (utils.build_components hard-codes transformer options an LSTM does not take)."""
    from benchmarks.common import build_from_flags

    _, task, model, criterion = build_from_flags([
        data_dir, "--cpu", "--save-dir", save_dir, "--dropout", "0", "--max-tokens", "1000",
        *utils.ARCH_TASK, *TINY_LSTM, *extra,
    ])
    return task, model, criterion


def padded_batch(task, n=6):
    # batches of the iterator are length-sorted (little padding): collate sentences of
    # n different source lengths instead
    ds = task.dataset("train")
    by_len = {}
    for i in range(len(ds)):
        by_len.setdefault(int(ds.src_sizes[i]), i)
    ids = [by_len[k] for k in sorted(by_len)][:n]
    assert len(ids) == n, f"the toy corpus has only {len(ids)} source lengths"
    sample = ds.collater([ds[i] for i in ids])
    src = sample["net_input"]["src_tokens"]
    pad = task.src_dict.pad()
    assert src[:, 0].eq(pad).any(), "the test needs a left-padded source batch"
    return sample


@pytest.mark.parametrize("method", ["arch", "smart", "r3f", "freelb"])
def test_lstm_criterion_runs_on_padded_batches(small_toy, tmp_path, method):
    # sizes well above float32's noise: this untrained toy LSTM's KL at eps 0.1 is ~1e-6 over
    # the batch, where the rounding of p - q decides even its sign
    sizes = ["--adv-eps", "1.0"] + (["--adv-init-scale", "0.1"] if method == "r3f" else [])
    task, model, criterion = build_lstm(small_toy, str(tmp_path), ["--adv-method", method, "--adv-steps", "2", *sizes])
    sample = padded_batch(task)
    model.train()
    if method == "arch":
        task.begin_epoch(1, model)
    # raised "the source perturbation was applied 0 times" before the hook knew the LSTM
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert torch.isfinite(loss)
    if method != "freelb":
        assert log["adv_loss"] > 1e-6, "the perturbation changed nothing"
    if method == "arch":
        # the next epoch reads the cache back through the same hook
        task.begin_epoch(2, model)
        loss, _, log = criterion(model, sample)
        assert torch.isfinite(loss) and log["arch_cached"] + log["arch_rebuilt"] == len(sample["id"])


def test_lstm_perturbation_rows_follow_their_tokens(small_toy, tmp_path):
    """The LSTM packs sequences and masks padded attention, so a sentence's output does
    not depend on the padding around it: perturbed in a left-padded batch it must give
    what it gives alone (no padding), with its own delta rows."""
    task, model, _ = build_lstm(small_toy, str(tmp_path))
    model.eval()
    sample = padded_batch(task)
    net = sample["net_input"]
    src, prev = net["src_tokens"], net["prev_output_tokens"]
    pad = task.src_dict.pad()
    src_mask, tgt_mask = src.ne(pad), prev.ne(pad)
    g = torch.Generator().manual_seed(0)
    d_src = torch.randn(*src.shape, 16, generator=g) * src_mask.unsqueeze(-1)  # B x S x C
    d_tgt = torch.randn(*prev.shape, 16, generator=g) * tgt_mask.unsqueeze(-1)  # B x T x C

    with torch.no_grad():
        clean = model(**net)[0]
        with perturbed_embeddings(model, src, prev, d_src, d_tgt) as applied:
            batch_out = model(**net)[0]  # B x T x V
        check_applied(applied, d_src, d_tgt)
        assert (batch_out - clean).abs().max() > 1e-3, "the perturbation changed nothing"
        for b in range(src.size(0)):
            s_b, n_t = src[b][src_mask[b]].unsqueeze(0), int(tgt_mask[b].sum())
            p_b = prev[b, :n_t].unsqueeze(0)  # targets are right-padded
            with perturbed_embeddings(model, s_b, p_b, d_src[b][src_mask[b]].unsqueeze(0),
                                      d_tgt[b, :n_t].unsqueeze(0)):
                alone = model(src_tokens=s_b, src_lengths=torch.tensor([s_b.size(1)]),
                              prev_output_tokens=p_b)[0]
            torch.testing.assert_close(batch_out[b, :n_t], alone[0], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"sentence {b} of the padded batch: {m}")


def test_lstm_trains_with_arch(small_toy, tmp_path):
    """fairseq-train --arch lstm with ARCH across a refresh and a reuse epoch."""
    save = str(tmp_path / "ckpt")
    utils.train(small_toy, save, [*utils.ARCH_TASK, *TINY_LSTM, "--max-epoch", "2",
                                  "--arch-refresh-interval", "2", "--adv-steps", "1",
                                  "--no-save", "--seed", "3"])
    assert os.path.exists(os.path.join(save, "arch_cache", "gen-e0001", "COMPLETE"))
