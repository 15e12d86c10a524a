"""Shared pieces of the benchmarks: real data (a Multi30k slice from ../shared/data,
or a path), binarised once per size, and a fairseq task/model/criterion built
in-process exactly as fairseq-train builds them."""

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from fairseq_arch.in_process import PLUGIN_FLAGS as ARCH_FLAGS, build_from_flags  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_arch")
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
MULTI30K = os.environ.get("ARCH_MULTI30K", os.path.join(SHARED, "multi30k", "tok"))
TATOEBA = os.environ.get("ARCH_TATOEBA", os.path.join(SHARED, "tatoeba-deu-eng"))

SMALL_MODEL = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]


def progress():
    """scripts/progress.py: per-epoch lines of a running fairseq-train, progress of loops, and
    console_cmd (console scripts of this environment, not PATH's)."""
    scripts = os.path.join(REPO, "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import progress as mod

    return mod


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def multi30k_bin(work: str, n_train: int, n_eval: int = 1000, threshold: int = 1) -> str:
    """Binarise the first ``n_train`` Multi30k training pairs (word level, joined
    dictionary; words seen fewer than ``threshold`` times map to <unk>) and
    valid/test_2016_flickr."""
    out = os.path.join(work, f"m30k-{n_train}" + (f"-t{threshold}" if threshold > 1 else ""))
    if os.path.exists(os.path.join(out, "bin", "dict.de.txt")):
        return os.path.join(out, "bin")
    if not os.path.isdir(MULTI30K):
        sys.exit(f"benchmarks: Multi30k not found at {MULTI30K} (set ARCH_MULTI30K to its tok/ folder)")
    raw = os.path.join(out, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, src, n in (("train", "train", n_train), ("valid", "val", n_eval), ("test", "test_2016_flickr", n_eval)):
        for lang in ("de", "en"):
            with open(os.path.join(MULTI30K, f"{src}.lc.norm.tok.{lang}")) as f:
                lines = [l for _, l in zip(range(n), f)]
            with open(os.path.join(raw, f"{split}.{lang}"), "w") as f:
                f.writelines(lines)
    subprocess.run(progress().console_cmd(
        ["fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--trainpref", f"{raw}/train",
         "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test", "--destdir", os.path.join(out, "bin"),
         "--joined-dictionary", "--thresholdsrc", str(threshold), "--thresholdtgt", str(threshold), "--workers", "2"]),
        check=True, capture_output=True)
    return os.path.join(out, "bin")


IWSLT_MODEL = ["--arch", "transformer_iwslt_de_en", "--share-all-embeddings"]


def on_gpu() -> bool:
    return torch.cuda.is_available()


def build(data_bin: str, save_dir: str, extra=(), model_arch: str = None):
    """(cfg, task, model, criterion) as fairseq-train builds them: the small CPU
    transformer, or transformer_iwslt_de_en on a GPU when one is present; ``model_arch``:
    that fairseq --arch with its own sizes, on either."""
    gpu = on_gpu()
    model = ["--arch", model_arch, "--share-all-embeddings"] if model_arch else IWSLT_MODEL if gpu else SMALL_MODEL
    return build_from_flags([
        data_bin, *([] if gpu else ["--cpu"]), "--save-dir", save_dir, *ARCH_FLAGS,
        "--max-tokens", "4096", *model, *extra,
    ], cuda=gpu)


def train_batches(task, max_tokens=4096, seed=1):
    from fairseq import utils

    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=max_tokens, seed=seed, epoch=1)
    batches = list(itr.next_epoch_itr(shuffle=True))
    return [utils.move_to_cuda(b) for b in batches] if on_gpu() else batches


def earlier_rows(out_dir: str, name: str) -> list:
    """The rows of ``<out_dir>/<name>.json`` measured by an earlier run (none: []): a benchmark
    that measures several scales keeps the ones not re-measured."""
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def write_report(out_dir: str, name: str, result: dict, markdown: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    result = dict(result, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown + f"\n\n_{result['machine']}, {result['date']}_\n")
    print(markdown)
