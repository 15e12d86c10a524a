"""A cache dir belongs to one training job and one set of stored settings (issue 20).

1. Two fairseq-train jobs at once on one cache dir: the second is refused at start,
   naming the holder (host, pid, start); a killed holder does not block the resume.
   Without flock (some network filesystems) the holder record decides.
2. A resume with a setting that changes what is stored (--adv-eps, ...) is refused
   naming it; a layout of the previous format gets a message, not a KeyError.
3. A resume on other training data with the same sentence lengths is refused.
4. --arch-neighbors above the number of cached sentences is refused before anything is
   written, so the corrected rerun trains; a layout that holds nothing yet is replaced.
Every refusal's advice is followed and the run then trains.
"""

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fairseq_arch.cache import layout as cache_layout
from fairseq_arch.cache import lock
from fairseq_arch.cache.files import CacheMismatchError
from fairseq_arch.cache.lock import CacheInUseError
from fairseq_arch.cache.state import OwnerToken

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
TIMEOUT = 600
HOLDER = """
import sys, time
from fairseq_arch.cache.state import OwnerToken
print(OwnerToken(sys.argv[1]).stamp(), flush=True)
time.sleep(600)
"""


def train_argv(data_dir, save_dir, extra=()):
    return ["fairseq-train", data_dir, *utils.ARCH_TASK, *utils.TINY_MODEL, "--cpu", "--no-progress-bar",
            "--num-workers", "0", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000", "--dropout", "0",
            "--seed", "3", "--save-dir", save_dir, "--no-epoch-checkpoints", "--arch-refresh-interval", "2",
            "--arch-cache-fraction", "0.3", *extra]


def train(argv, ok=True, env=ENV):
    res = utils.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = res.stdout + res.stderr
    if ok:
        assert res.returncode == 0, out[-4000:]
    else:
        assert res.returncode not in (0, -signal.SIGKILL), f"expected a refusal, rc {res.returncode}:\n{out[-3000:]}"
    return out


def one_line(out):
    return " ".join(out.split())


# -- the lock alone ----------------------------------------------------------------------------


def hold_in_another_process(cache_dir):
    proc = utils.popen([sys.executable, "-c", HOLDER, cache_dir], stdout=subprocess.PIPE, text=True, env=ENV,
                       cwd=utils.REPO)
    token = proc.stdout.readline().strip()
    assert token, "the holder process did not take the lock"
    return proc, token


def test_second_process_is_refused_until_the_holder_is_killed(tmp_path):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    proc, token = hold_in_another_process(cache_dir)
    try:
        assert OwnerToken(cache_dir).read() == token  # another rank of the holder's job reads it back
        with pytest.raises(CacheInUseError) as err:
            OwnerToken(cache_dir).stamp()
        msg = str(err.value)
        for part in (cache_dir, f"host {socket.gethostname()}", f"pid {proc.pid}", "started ", "Wait for that job",
                     f"kill {proc.pid}", "--arch-cache-dir pointing elsewhere"):
            assert part in msg, (part, msg)
        assert OwnerToken(cache_dir).read() == token, "a refused process changed the holder's record"
    finally:
        utils.kill_group(proc)
    # killed: the OS dropped its lock; this process takes the dir (and keeps it on a second open)
    mine = OwnerToken(cache_dir).stamp()
    assert mine != token and OwnerToken(cache_dir).read() == mine
    again = OwnerToken(cache_dir).stamp()
    assert again != mine and OwnerToken(cache_dir).read() == again
    rec = json.load(open(os.path.join(cache_dir, "owner.token")))
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["released"] is None


FORKING_HOLDER = """
import os, sys, time
from fairseq_arch.cache.state import OwnerToken
OwnerToken(sys.argv[1]).stamp()
child = os.fork()  # as a DataLoader worker is: it inherits the locked fd
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    proc = utils.popen([sys.executable, "-c", FORKING_HOLDER, cache_dir], stdout=subprocess.PIPE, text=True,
                       env=ENV, cwd=utils.REPO)
    try:
        child = int(proc.stdout.readline())
        with pytest.raises(CacheInUseError):
            OwnerToken(cache_dir).stamp()
        os.kill(proc.pid, signal.SIGKILL)  # the holder only; its child lives on
        proc.wait()
        os.kill(child, 0)
        OwnerToken(cache_dir).stamp()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def write_record(path, **fields):
    rec = dict(token="0" * 32, host=socket.gethostname(), pid=None, pid_start=None, boot_id=None,
               started="2026-01-01 00:00:00 UTC", released=None)
    rec.update(fields)
    with open(path, "w") as f:
        json.dump(rec, f)


def test_without_flock_the_holder_record_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    cases = [  # (record, refused)
        (dict(pid=alive, pid_start=lock._proc_start(alive)), True),  # a live process on this host
        (dict(pid=alive, pid_start=12345), False),  # its pid, but another process (pid reused)
        (dict(pid=dead.pid), False),  # ended
        (dict(pid=alive, host="other-node"), True),  # cannot be checked from here
        (dict(pid=alive, host="other-node", released="2026-01-01 01:00:00 UTC"), False),  # ended normally
    ]
    for i, (fields, refused) in enumerate(cases):
        cache_dir = str(tmp_path / f"c{i}")
        os.makedirs(cache_dir)
        path = os.path.join(cache_dir, "owner.token")
        write_record(path, **fields)
        if not refused:
            OwnerToken(cache_dir).stamp()
            continue
        with pytest.raises(CacheInUseError) as err:
            OwnerToken(cache_dir).stamp()
        msg = str(err.value)
        assert f"pid {alive}" in msg and "is in use by another training job" in msg, msg
        if fields.get("host") == "other-node":
            # the advice for a holder that cannot be checked: delete the record once it is gone
            assert f"delete {path}" in msg, msg
            os.remove(path)
            OwnerToken(cache_dir).stamp()


# -- through fairseq-train ---------------------------------------------------------------------


def wait_for(path, text, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        assert proc.poll() is None, open(path).read()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not seen in {path}")


def test_two_jobs_on_one_cache_dir(small_toy, tmp_path):
    """Job A holds the dir (stopped in its first refresh batch); job B on the same
    --save-dir with another --adv-eps is refused naming A; B with a --save-dir of its own
    trains; A killed, its resume trains; then B's settings are refused by the layout
    (naming --adv-eps), and with a cache dir of its own B's resume trains."""
    save = str(tmp_path / "a")
    log = str(tmp_path / "a.log")
    a_argv = train_argv(small_toy, save, ["--max-epoch", "2"])
    with open(log, "w") as f:
        a = utils.popen(a_argv, stdout=f, stderr=subprocess.STDOUT,
                        env=dict(ENV, FAIRSEQ_ARCH_SLEEP="refresh_batch@1:600"))
    try:
        wait_for(log, "FAIRSEQ_ARCH_SLEEP: sleeping", a)
        b_extra = ["--max-epoch", "2", "--adv-eps", "0.2"]
        out = one_line(train(train_argv(small_toy, save, b_extra), ok=False))
        assert f"--arch-cache-dir {os.path.join(save, 'arch_cache')} is in use by another training job" in out, out
        assert f"host {socket.gethostname()}, pid {a.pid}, started " in out, out[-3000:]
        assert "Wait for that job to end, or stop it" in out
        # the advice: a cache of its own (here with its own --save-dir, as the message says)
        train(train_argv(small_toy, str(tmp_path / "b"), b_extra))
        assert a.poll() is None, "job A ended: the refusal above did not come from a running holder"
    finally:
        utils.kill_group(a)
    # the advice "stop it": A killed mid-refresh, its resume is not blocked by the stale holder
    out = train(a_argv)
    assert "in use by another training job" not in out
    assert "ended without releasing it" in out or "taking it over" in out
    # B's settings on A's cache: refused by the layout, naming the setting and its option
    b_resume = train_argv(small_toy, save, ["--max-epoch", "3", "--adv-eps", "0.2"])
    out = one_line(train(b_resume, ok=False))
    assert "adv_eps: cache has 0.1, this run has 0.2 (--adv-eps)" in out, out[-3000:]
    assert "or start anew: point --arch-cache-dir to an empty directory" in out
    # the advice: an empty --arch-cache-dir; the resumed run trains epoch 3 (a refresh)
    out = train(b_resume + ["--arch-cache-dir", str(tmp_path / "b_cache")])
    assert "ARCH epoch 3: refresh" in out


def shuffled_words(raw_dir, out_dir, seed=0):
    """The raw corpus with the words of every training sentence shuffled (same lengths)."""
    shutil.copytree(raw_dir, out_dir)
    rng = random.Random(seed)
    for side in ("src", "tgt"):
        path = os.path.join(out_dir, f"train.{side}")
        lines = open(path).read().splitlines()
        out = []
        for line in lines:
            words = line.split()
            rng.shuffle(words)
            out.append(" ".join(words))
        assert out != lines
        open(path, "w").write("\n".join(out) + "\n")


def test_resume_on_other_data_with_the_same_lengths_is_refused(small_toy, tmp_path):
    save = str(tmp_path / "ckpt")
    train(train_argv(small_toy, save, ["--max-epoch", "1"]))
    raw = os.path.join(os.path.dirname(small_toy), "raw")
    other = str(tmp_path / "other_bin")
    shuffled_words(raw, str(tmp_path / "other_raw"))
    utils.preprocess(str(tmp_path / "other_raw"), other, extra=["--srcdict", os.path.join(small_toy, "dict.src.txt")])
    for f in ("train.src-tgt.src.idx", "train.src-tgt.tgt.idx", "dict.src.txt", "dict.tgt.txt"):
        assert open(os.path.join(other, f), "rb").read() == open(os.path.join(small_toy, f), "rb").read(), f
    resume = ["--max-epoch", "2"]
    out = one_line(train(train_argv(other, save, resume), ok=False))
    assert "the training data changed since this cache was made" in out, out[-3000:]
    assert "tokens_sha1: cache has" in out and "sizes_sha1" not in out and "n_sentences" not in out
    # the advice: resume on the data the cache was made for
    out = train(train_argv(small_toy, save, resume))
    assert "ARCH epoch 2: reuse" in out


def test_too_many_neighbours_is_refused_before_anything_is_written(small_toy, tmp_path):
    save = str(tmp_path / "ckpt")
    flags = ["--max-epoch", "1", "--arch-cache-fraction", "0.25"]  # 30 of 120 sentences
    out = one_line(train(train_argv(small_toy, save, flags + ["--arch-neighbors", "50"]), ok=False))
    assert "--arch-neighbors 50 exceeds the 30 cached sentences" in out, out[-3000:]
    assert "use --arch-neighbors 30 or fewer" in out
    cache_dir = os.path.join(save, "arch_cache")
    assert not os.path.exists(os.path.join(cache_dir, "layout.json"))
    # the advice followed: the corrected rerun trains
    train(train_argv(small_toy, save, flags + ["--arch-neighbors", "5"]))
    assert json.load(open(os.path.join(cache_dir, "layout.json")))["num_neighbors"] == 5


def test_layout_that_holds_nothing_yet_is_replaced(small_toy, tmp_path):
    """A dir left by a start that wrote its layout but no generation (before the first
    refresh epoch; or by an older version that wrote the layout before refusing
    --arch-neighbors): nothing is lost by replacing its layout, so a run with other
    settings takes it, logged."""
    save = str(tmp_path / "ckpt")
    train(train_argv(small_toy, save, ["--max-epoch", "1", "--arch-first-refresh-epoch", "3"]))
    path = os.path.join(save, "arch_cache", "layout.json")
    old = json.load(open(path))
    old["num_neighbors"] = 50
    json.dump(old, open(path, "w"))
    out = train(train_argv(small_toy, str(tmp_path / "fresh"), ["--max-epoch", "1",
                                                                "--arch-cache-dir", os.path.dirname(path)]))
    assert "holds no perturbations yet: replacing its layout" in out and "num_neighbors: cache has 50" in out
    assert json.load(open(path))["num_neighbors"] == 1


def test_layout_of_the_previous_format_is_refused_with_a_message(small_toy, tmp_path):
    save = str(tmp_path / "ckpt")
    every = ["--arch-refresh-interval", "1"]  # every epoch a refresh: a deleted cache is recomputed
    train(train_argv(small_toy, save, ["--max-epoch", "1", *every]))
    path = os.path.join(save, "arch_cache", "layout.json")
    new = json.load(open(path))
    json.dump({k: new[k] for k in cache_layout.FORMAT_KEYS[1]} | {"format": 1}, open(path, "w"))
    resume = train_argv(small_toy, save, ["--max-epoch", "2", *every])
    out = one_line(train(resume, ok=False))
    assert "was made by an older fairseq-arch" in out and "layout format 1" in out, out[-3000:]
    assert "KeyError" not in out and "or start anew: point --arch-cache-dir to an empty directory" in out
    # the advice: delete it; the resumed run recomputes the cache
    shutil.rmtree(os.path.dirname(path))
    out = train(resume)
    assert "ARCH epoch 2: refresh" in out


@pytest.mark.fast
def test_every_stored_setting_is_in_the_layout(tmp_path):
    """The fingerprint's settings, each with the option named in the messages."""
    import numpy as np

    sizes = np.array([3, 4, 5])
    lay = cache_layout.CacheLayout(str(tmp_path), sizes, sizes, {"source": 4}, 1.0, 1, "float16", 1,
                                   ball=(0.1, "l2", "sentence"), ema=0.01, recipe="text", tokens="ab")
    fp = lay.fingerprint
    assert (fp["adv_eps"], fp["adv_norm"], fp["adv_granularity"], fp["arch_ema"], fp["arch_recipe"],
            fp["sides"], fp["tokens_sha1"]) == (0.1, "l2", "sentence", 0.01, "text", ["source"], "ab")
    assert set(fp) - {"format"} <= set(cache_layout.OPTIONS)
    os.makedirs(tmp_path, exist_ok=True)
    with open(lay.layout_path, "w") as f:
        json.dump(dict(fp, adv_norm="linf"), f)
    with pytest.raises(CacheMismatchError, match=r"adv_norm: cache has 'linf', this run has 'l2' \(--adv-norm\)"):
        lay.check_existing()
