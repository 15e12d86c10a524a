"""Helpers shared by the tests: tiny corpora, in-process fairseq CLI calls (as in
fairseq's own tests/utils.py), and a ready task/model/criterion for unit tests."""

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_arch")
SHARED_DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import toy_corpus  # noqa: E402

TINY_MODEL = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
from fairseq_arch.in_process import PLUGIN_FLAGS, build_from_flags  # noqa: E402

ARCH_TASK = list(PLUGIN_FLAGS)


def console(name: str) -> str:
    """Path of a console script (fairseq-train, ...) of the Python running the tests, not
    whatever PATH finds first: a package missing from this environment must fail here."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(path), f"{name} is not installed next to {sys.executable}"
    return path


def cli(cmd):
    """A command line whose first word, if a console script name, is resolved by console()."""
    cmd = list(cmd)
    if cmd and not os.path.sep in cmd[0] and cmd[0].startswith("fairseq-"):
        cmd[0] = console(cmd[0])
    return cmd


def run(cmd, timeout=900, input=None, capture_output=False, **kw):
    """subprocess.run with a timeout that kills the whole process group (fairseq ranks,
    dataloader workers) instead of leaving it behind; console scripts resolved by cli()."""
    if capture_output:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    proc = subprocess.Popen(cli(cmd), start_new_session=True, **kw)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def popen(cmd, **kw):
    """subprocess.Popen in its own process group (kill_group() ends it and its children)."""
    return subprocess.Popen(cli(cmd), start_new_session=True, **kw)


def kill_group(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def require_shared(*parts) -> str:
    """Path under ../shared/data; skips when absent, or fails when ARCH_REQUIRE_DATA=1 (CI),
    so a CI run can never go green by silently skipping the real-data tests."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        msg = f"{path} not present (the real corpora beside the checkout, README 'Real data')"
        if os.environ.get("ARCH_REQUIRE_DATA") == "1":
            pytest.fail(msg + "; ARCH_REQUIRE_DATA=1 turns this skip into a failure", pytrace=False)
        pytest.skip(msg)
    return path


def preprocess(raw_dir: str, dest_dir: str, src="src", tgt="tgt", extra=()) -> None:
    from fairseq import options
    from fairseq_cli import preprocess as prep

    parser = options.get_preprocessing_parser()
    args = parser.parse_args([
        "--source-lang", src, "--target-lang", tgt,
        "--trainpref", os.path.join(raw_dir, "train"),
        "--validpref", os.path.join(raw_dir, "valid"),
        "--testpref", os.path.join(raw_dir, "test"),
        "--destdir", dest_dir, "--joined-dictionary", "--workers", "1", *extra,
    ])
    prep.main(args)


def make_toy_data(root: str, n_train=400, n_valid=40, n_test=40, seed=1) -> str:
    raw = os.path.join(root, "raw")
    bin_dir = os.path.join(root, "bin")
    toy_corpus.write_corpus(raw, n_train, n_valid, n_test, seed)
    preprocess(raw, bin_dir)
    return bin_dir


def train(data_dir: str, save_dir: str, extra=(), quiet=True):
    """fairseq-train in-process; returns the cfg used."""
    from fairseq import options
    from fairseq_cli import train as train_cli

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_dir, "--save-dir", save_dir, "--cpu", "--no-progress-bar", "--log-format", "simple",
        "--log-interval", "1000", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000",
        "--num-workers", "0", *extra,
    ])
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(args)
    train_cli.main(cfg)
    return cfg


def generate(data_dir: str, path: str, extra=()) -> str:
    """fairseq-generate in-process; returns its stdout."""
    from fairseq import options
    from fairseq_cli import generate as gen_cli

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, [
        data_dir, "--path", path, "--cpu", "--beam", "2", "--batch-size", "32", *extra,
    ])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gen_cli.main(args)
    return buf.getvalue()


def build_components(data_dir: str, extra=(), save_dir: str = None):
    """(cfg, task, model, criterion) exactly as fairseq-train builds them: the tiny CPU
    model with ARCH, no dropout."""
    return build_from_flags([
        data_dir, "--cpu", "--save-dir", save_dir or os.path.join(data_dir, "ckpt"),
        "--dropout", "0", "--max-tokens", "1000", *ARCH_TASK, *TINY_MODEL, *extra,
    ])


def build_for_training(data_dir: str, tmp_path, extra=()):
    """(task, model, criterion) of build_components, the model in train mode."""
    _, task, model, crit = build_components(data_dir, list(extra), save_dir=str(tmp_path))
    model.train()
    return task, model, crit


def record_deltas(crit, monkeypatch, with_masks=False):
    """Every delta the criterion feeds a perturbed forward, in order (ascent steps, then
    the one its regulariser used): ``{side: delta}`` each, or ``{side: (delta, padding
    mask of the side)}`` ``with_masks``; a list that fills as the criterion runs. The
    criterion's ``perturbed_forward`` is its one deliberate hook for this."""
    seen = []
    real = crit.perturbed_forward

    def record(model, net_input, delta):
        masks = {"source": net_input["src_tokens"].ne(crit.padding_idx),
                 "target": net_input["prev_output_tokens"].ne(crit.padding_idx)}
        seen.append({k: (v.detach().clone(), masks[k]) if with_masks else v.detach().clone()
                     for k, v in delta.items()})
        return real(model, net_input, delta)

    monkeypatch.setattr(crit, "perturbed_forward", record)
    return seen


def perturbed(crit, model, batch, delta):
    """``model(**net_input)`` with ``delta`` (side -> B x T x C) added to the embedding
    lookups, through the injection hook alone (not the criterion, so no spy sees it)."""
    from fairseq_arch.injection import check_applied, perturbed_embeddings

    net_input = batch["net_input"]
    with perturbed_embeddings(model, net_input["src_tokens"], net_input["prev_output_tokens"],
                              delta.get("source"), delta.get("target")) as applied:
        out = model(**net_input)
    check_applied(applied, delta.get("source"), delta.get("target"))
    return out


def batches(task, max_sentences=None, max_tokens=1000):
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens, max_sentences=max_sentences,
        seed=1, epoch=1,
    ).next_epoch_itr(shuffle=False)
    return list(itr)


def quiet_logs():
    logging.getLogger("fairseq").setLevel(logging.WARNING)
