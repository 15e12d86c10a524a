"""Helpers shared by the tests: tiny corpora, in-process fairseq CLI calls (as in
fairseq's own tests/utils.py), and a ready task/model/criterion for unit tests."""

import contextlib
import io
import logging
import os
import sys

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
ARCH_TASK = ["--user-dir", USER_DIR, "--task", "arch_translation",
             "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


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
    """(cfg, task, model, criterion) exactly as fairseq-train builds them."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_dir, "--cpu", "--save-dir", save_dir or os.path.join(data_dir, "ckpt"),
        "--dropout", "0", "--max-tokens", "1000", *ARCH_TASK, *TINY_MODEL, *extra,
    ])
    cfg = convert_namespace_to_omegaconf(args)
    from fairseq import utils

    utils.import_user_module(cfg.common)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def batches(task, max_sentences=None, max_tokens=1000):
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens, max_sentences=max_sentences,
        seed=1, epoch=1,
    ).next_epoch_itr(shuffle=False)
    return list(itr)


def quiet_logs():
    logging.getLogger("fairseq").setLevel(logging.WARNING)
