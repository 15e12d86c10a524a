"""What training does, pinned bit for bit: for every method, the parameters after a
few updates of fairseq's Trainer from a fixed seed on the toy corpus, and for ARCH the
bytes of its cache generation.

A refactor must not change a single bit of these (the fingerprints in
``tests/fingerprints.json`` were recorded before the code was restructured into
``fairseq_arch/methods/``). A deliberate change of what training computes must
regenerate them and say why in its commit::

    FAIRSEQ_ARCH_WRITE_FINGERPRINTS=1 bash scripts/test.sh tests/test_fingerprints.py

Bit equality holds for one machine kind and torch build (CI's, this project's
machines: torch pinned by scripts/install.sh) at one intra-op thread, set here.

Each scenario runs epoch 1 (every batch, one update each) and, for ARCH, epoch 2 as
a reuse epoch (``--arch-refresh-interval 2``) on the generation epoch 1 refreshed.
Dropout is on (0.1), so R-Drop's two masks and every method's dropout draws count.
"""

import hashlib
import json
import os

import pytest
import torch

from . import utils

FINGERPRINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fingerprints.json")
WRITE = os.environ.get("FAIRSEQ_ARCH_WRITE_FINGERPRINTS") == "1"

COMMON = ["--adv-steps", "2", "--arch-refresh-interval", "2", "--optimizer", "adam", "--lr", "0.005",
          "--dropout", "0.1", "--seed", "3"]

# name -> (flags, epochs trained)
SCENARIOS = {
    "none": (["--adv-method", "none"], 1),
    "r3f": (["--adv-method", "r3f"], 1),
    "smart": (["--adv-method", "smart"], 1),
    "freelb": (["--adv-method", "freelb"], 1),
    "rdrop": (["--adv-method", "rdrop", "--adv-lambda", "5"], 1),
    "arch": (["--adv-method", "arch"], 2),
    "arch-p1": (["--adv-method", "arch", "--arch-cache-fraction", "1"], 2),
    "arch-neighbor-epoch": (["--adv-method", "arch", "--arch-rebuild-norm", "neighbor",
                             "--arch-neighbor-search", "epoch", "--arch-refresh-interval", "3"], 3),
    "arch-word-linf": (["--adv-method", "arch", "--adv-norm", "linf", "--adv-granularity", "word",
                        "--adv-sides", "target", "--arch-rebuild-norm", "eps"], 2),
    "arch-first2": (["--adv-method", "arch", "--arch-first-refresh-epoch", "2"], 3),
    # added with the methods of issue 19 (recorded when they were written)
    "zero-delta": (["--adv-method", "zero-delta"], 1),
    "arch-rdrop": (["--adv-method", "arch-rdrop", "--adv-lambda", "5"], 2),
    "smart-teacher-grad": (["--adv-method", "smart", "--adv-teacher", "grad", "--adv-kl", "symmetric"], 1),
}


def _digest_params(model) -> dict:
    h = hashlib.sha256()
    total = 0.0
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
        total += float(p.detach().double().sum())
    return {"sha256": h.hexdigest(), "sum": round(total, 6)}


def _digest_generation(cache_dir: str) -> dict:
    """sha256 of every .bin / .npy file of the current generation (the files its
    checksums cover; COMPLETE holds timings)."""
    with open(os.path.join(cache_dir, "state.json")) as f:
        current = json.load(f)["current"]
    gen = os.path.join(cache_dir, current["name"])
    out = {"generation": current["name"]}
    for fname in sorted(os.listdir(gen)):
        if fname.endswith((".bin", ".npy")):
            with open(os.path.join(gen, fname), "rb") as f:
                out[fname] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_scenario(data_dir: str, save_dir: str, flags, epochs: int) -> dict:
    from fairseq.trainer import Trainer

    cfg, task, model, crit = utils.build_components(data_dir, [*COMMON, *flags], save_dir=save_dir)
    trainer = Trainer(cfg, task, model, crit)
    result = {}
    for epoch in range(1, epochs + 1):
        task.begin_epoch(epoch, trainer.model)
        itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=1000, seed=3, epoch=epoch)
        for batch in itr.next_epoch_itr(shuffle=True):
            log = trainer.train_step([batch])
            assert log is not None, "an update was skipped"
        result[f"epoch{epoch}"] = _digest_params(model)
        result[f"epoch{epoch}_loss"] = round(float(log["loss"]), 6)
    cache_dir = os.path.join(save_dir, "arch_cache")
    if os.path.isdir(cache_dir):
        task.begin_epoch(epochs + 1, trainer.model)  # finalises a refresh of the last epoch
        result["cache"] = _digest_generation(cache_dir)
    return result


@pytest.fixture(scope="module")
def recorded():
    if WRITE or not os.path.exists(FINGERPRINTS):
        return {}
    with open(FINGERPRINTS) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def written():
    out = {}
    yield out
    if WRITE:
        with open(FINGERPRINTS, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_training_is_bit_identical_to_the_recorded_fingerprint(small_toy, tmp_path, recorded, written, name):
    flags, epochs = SCENARIOS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = run_scenario(small_toy, str(tmp_path / name), flags, epochs)
    finally:
        torch.set_num_threads(threads)
    if WRITE:
        written[name] = got
        return
    assert name in recorded, f"no recorded fingerprint for {name}: regenerate {FINGERPRINTS} (module docstring)"
    assert got == recorded[name], f"{name}: training changed (recorded {recorded[name]}, now {got})"


def test_scenarios_cover_every_method():
    from fairseq_arch.methods import method_names

    covered = {flags[flags.index("--adv-method") + 1] for flags, _ in SCENARIOS.values()}
    assert covered == set(method_names())
