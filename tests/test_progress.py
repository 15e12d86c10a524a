"""scripts/progress.py: the live per-epoch lines of demo.sh, the benchmarks and the recipe train script.
Pure parsing on real fairseq 0.12 log lines (simple format from `bash scripts/demo.sh --smoke`, json
format as benchmarks/quality.py logs), ETA arithmetic, and a failing run's status."""

import io
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import progress  # noqa: E402

# from runs/demo/train.log of `bash scripts/demo.sh --smoke` (3 epochs, Tc = 2); the config line cut
# down to the keys the parser reads, the model printout and dataset lines left out
SIMPLE_LOG = """\
2026-11-25 22:55:38 | INFO | fairseq_cli.train | {'_name': None, 'common': {'_name': None, 'no_progress_bar': True, 'log_interval': 50, 'log_format': 'simple'}, 'optimization': {'_name': None, 'max_epoch': 3, 'max_update': 0}, 'task': {'_name': 'arch_translation', 'data': '/tmp/prog_smoke0/bin', 'arch_refresh_interval': 2, 'arch_ema': 0.01}, 'criterion': {'_name': 'adversarial_label_smoothed_cross_entropy', 'label_smoothing': 0.1, 'adv_method': arch, 'adv_lambda': 1.0}}
2026-11-25 22:55:38 | INFO | fairseq_cli.train | TransformerModel(
  (encoder): TransformerEncoderBase(
2026-11-25 22:55:40 | INFO | fairseq_cli.train | begin dry-run validation on "valid" subset
2026-11-25 22:55:40 | INFO | fairseq.data.iterators | grouped total_num_itrs = 2
2026-11-25 22:55:40 | INFO | fairseq.trainer | begin training epoch 1
2026-11-25 22:55:40 | INFO | fairseq_arch.arch_cache | ARCH cache /tmp/prog_smoke0/checkpoints/arch_cache: 40 of 400 sentences cached (p=0.1), source 0.1 MiB, target 0.1 MiB
2026-11-25 22:55:40 | INFO | fairseq_arch.arch_cache | ARCH epoch 1: refresh (fresh ascent)
2026-11-25 22:55:40 | INFO | fairseq_cli.train | Start iterating over samples
2026-11-25 22:56:11 | INFO | fairseq_cli.train | begin validation on "valid" subset
2026-11-25 22:56:13 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.634 | nll_loss 8.66 | ppl 404.61 | wps 358 | wpb 1500 | bsz 148 | num_updates 2
2026-11-25 22:56:13 | INFO | fairseq_cli.train | end of epoch 1 (average epoch stats below)
2026-11-25 22:56:13 | INFO | train | epoch 001 | loss 8.795 | nll_loss 8.511 | ls_loss 8.487 | adv_loss 0.3077 | adv_delta_norm 0.1 | adv_fwd_per_batch 5 | adv_bwd_per_batch 4 | arch_fresh 400 | arch_cached 0 | arch_rebuilt 0 | adv_skipped 0 | ppl 364.8 | wps 277.8 | ups 0.09 | wpb 2033.5 | bsz 200 | num_updates 2 | lr 1.33333e-05 | gnorm 5.67 | gnorm_sq 32.171 | gnorm_var 0.01651 | train_wall 31 | arch_nn_search_s 0 | wall 35
2026-11-25 22:56:13 | INFO | fairseq.data.iterators | grouped total_num_itrs = 2
2026-11-25 22:56:13 | INFO | fairseq.trainer | begin training epoch 2
2026-11-25 22:56:13 | INFO | fairseq_arch.arch_cache | ARCH cache: generation of epoch 1 complete; neighbour search 0.21s (faiss-cpu), total 0.22s
2026-11-25 22:56:13 | INFO | fairseq_arch.arch_cache | ARCH epoch 2: reuse (cache only)
2026-11-25 22:56:22 | INFO | fairseq_cli.train | begin validation on "valid" subset
2026-11-25 22:56:23 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 8.462 | nll_loss 8.476 | ppl 356.14 | wps 13226.4 | wpb 1500 | bsz 148 | num_updates 4 | best_loss 8.462
2026-11-25 22:56:23 | INFO | train | epoch 002 | loss 8.681 | nll_loss 8.452 | ls_loss 8.432 | adv_loss 0.2493 | adv_delta_norm 0.0735 | adv_fwd_per_batch 2 | adv_bwd_per_batch 1 | arch_fresh 0 | arch_cached 40 | arch_rebuilt 360 | adv_skipped 0 | ppl 350.27 | wps 407.5 | ups 0.2 | wpb 2033.5 | bsz 200 | num_updates 4 | lr 2.66667e-05 | gnorm 5.628 | gnorm_sq 31.687 | gnorm_var 0.01281 | train_wall 9 | arch_nn_search_s 0.212 | wall 45
2026-11-25 22:56:23 | INFO | fairseq.data.iterators | grouped total_num_itrs = 2
2026-11-25 22:56:23 | INFO | fairseq.trainer | begin training epoch 3
2026-11-25 22:56:23 | INFO | fairseq_arch.arch_cache | ARCH epoch 3: refresh (fresh ascent)
2026-11-25 22:56:26 | INFO | valid | epoch 003 | valid on 'valid' subset | loss 8.169 | nll_loss 8.163 | ppl 286.61 | wps 13153.6 | wpb 1500 | bsz 148 | num_updates 6 | best_loss 8.169
2026-11-25 22:56:26 | INFO | train | epoch 003 | loss 8.537 | nll_loss 8.255 | ls_loss 8.249 | adv_loss 0.2879 | adv_delta_norm 0.0999 | adv_fwd_per_batch 5 | adv_bwd_per_batch 4 | arch_fresh 400 | arch_cached 0 | arch_rebuilt 0 | adv_skipped 0 | ppl 305.45 | wps 1109.4 | ups 0.55 | wpb 2033.5 | bsz 200 | num_updates 6 | lr 4e-05 | gnorm 5.536 | gnorm_sq 30.661 | gnorm_var 0.015 | train_wall 3 | arch_nn_search_s 0.212 | wall 48
2026-11-25 22:56:26 | INFO | fairseq_cli.train | done training in 46.1 seconds
"""

# --log-format json --log-interval 1 (benchmarks/quality.py), 10 updates per epoch; epoch 1's first
# interval lines and epoch 2's start, some metrics left out
JSON_LOG = """\
2026-11-25 22:58:55 | INFO | fairseq_cli.train | {'_name': None, 'optimization': {'_name': None, 'max_epoch': 3, 'max_update': 0}, 'task': {'_name': 'arch_translation', 'arch_refresh_interval': 2}, 'criterion': {'_name': 'adversarial_label_smoothed_cross_entropy', 'adv_method': arch}}
2026-11-25 22:58:57 | INFO | fairseq.data.iterators | grouped total_num_itrs = 10
2026-11-25 22:58:57 | INFO | fairseq.trainer | begin training epoch 1
2026-11-25 22:58:57 | INFO | fairseq_arch.arch_cache | ARCH epoch 1: refresh (fresh ascent)
2026-11-25 22:59:02 | INFO | train_inner | {"epoch": 1, "update": 0.1, "loss": "8.246", "adv_loss": "0.2081", "arch_fresh": "40", "num_updates": "1", "gnorm": "1.391", "train_wall": "6", "wall": "8"}
2026-11-25 22:59:04 | INFO | train_inner | {"epoch": 1, "update": 0.2, "loss": "7.988", "adv_loss": "0.2174", "arch_fresh": "56", "num_updates": "2", "gnorm": "1.536", "train_wall": "1", "wall": "9"}
2026-11-25 22:59:17 | INFO | train_inner | {"epoch": 1, "update": 1.0, "loss": "7.321", "adv_loss": "0.121", "arch_fresh": "32", "num_updates": "10", "gnorm": "0.913", "train_wall": "2", "wall": "23"}
2026-11-25 22:59:17 | INFO | fairseq_cli.train | begin validation on "valid" subset
2026-11-25 22:59:19 | INFO | valid | {"epoch": 1, "valid_loss": "6.976", "valid_nll_loss": "6.869", "valid_ppl": "116.91", "valid_wps": "3133.6", "valid_wpb": "428.6", "valid_bsz": "42.3", "valid_num_updates": "10"}
2026-11-25 22:59:19 | INFO | train | {"epoch": 1, "train_loss": "7.713", "train_nll_loss": "7.481", "train_ls_loss": "7.54", "train_adv_loss": "0.1727", "train_adv_fwd_per_batch": "5", "train_arch_fresh": "400", "train_arch_cached": "0", "train_arch_rebuilt": "0", "train_num_updates": "10", "train_gnorm": "1.253", "train_gnorm_var": "0.03687", "train_train_wall": "21", "train_arch_nn_search_s": "0", "train_wall": "25"}
2026-11-25 22:59:19 | INFO | fairseq.data.iterators | grouped total_num_itrs = 10
2026-11-25 22:59:19 | INFO | fairseq.trainer | begin training epoch 2
2026-11-25 22:59:19 | INFO | fairseq_arch.arch_cache | ARCH epoch 2: reuse (cache only)
2026-11-25 22:59:25 | INFO | train_inner | {"epoch": 2, "update": 1.1, "loss": "7.229", "adv_loss": "0.101", "arch_cached": "5", "arch_rebuilt": "35", "num_updates": "11", "train_wall": "5", "wall": "31"}
"""


def feed(text, parser=None):
    parser = parser or progress.LogParser()
    events = [ev for line in text.splitlines(keepends=True) for ev in parser.feed(line)]
    return parser, events


def epochs(events):
    return [ev[1] for ev in events if ev[0] == "epoch"]


@pytest.mark.fast
def test_simple_log_gives_one_epoch_line_per_epoch_with_its_fields():
    parser, events = feed(SIMPLE_LOG)
    es = epochs(events)
    assert [e.epoch for e in es] == [1, 2, 3]
    assert (parser.total, parser.interval, parser.method, parser.updates_per_epoch) == (3, 2, "arch", 2)
    assert [e.train_loss for e in es] == ["8.795", "8.681", "8.537"]
    assert [e.valid_loss for e in es] == ["8.634", "8.462", "8.169"]
    assert [e.adv_loss for e in es] == ["0.3077", "0.2493", "0.2879"]
    # refresh epochs run the ascent, the reuse epoch reads the cache
    assert [e.kind for e in es] == ["refresh", "reuse", "refresh"]
    assert es[1].stats["arch_rebuilt"] == "360" and es[0].stats["arch_fresh"] == "400"
    # seconds from "begin training epoch N" to its summary: training + validation + checkpoint
    assert [e.seconds for e in es] == [33.0, 10.0, 3.0]
    assert parser.finished and parser.error is None

    lines = [progress.format_epoch(e) for e in es]
    assert lines[0].startswith("  epoch  1/3  refresh  train loss  8.795  valid loss  8.634  adv_loss=0.3077")
    assert "33 s  ~1m06s left (1 refresh, 1 reuse) | adv_fwd_per_batch=5 arch_fresh=400" in lines[0]
    # after epoch 2 the one epoch left is a refresh: priced at epoch 1's 33 s (the only refresh so far)
    assert "reuse    train loss  8.681" in lines[1] and "10 s  ~33 s left (1 refresh) |" in lines[1]
    assert "arch_cached=40 arch_rebuilt=360 arch_nn_search_s=0.212" in lines[1]
    assert "3 s  done |" in lines[2]


@pytest.mark.fast
def test_json_log_epoch_fields_and_in_epoch_progress():
    parser, events = feed(JSON_LOG)
    (e,) = epochs(events)
    assert (e.epoch, e.kind, e.train_loss, e.valid_loss, e.adv_loss, e.seconds) == (1, "refresh", "7.713", "6.976", "0.1727", 22.0)
    # json prefixes end-of-epoch keys with the tag: train_train_wall is the epoch's training time, train_wall the run's wall
    assert (e.stats["train_wall"], e.stats["wall"], e.stats["arch_fresh"]) == ("21", "25", "400")
    inner = [ev[1:] for ev in events if ev[0] == "inner"]
    assert inner == [(1, 1, 10), (1, 2, 10), (1, 10, 10), (2, 1, 10)]
    assert [ev for ev in events if ev[0] in ("begin", "validate")] == [("begin", 1), ("validate", 1), ("begin", 2)]
    # epoch 2 (reuse) is running: 1 of 10 updates after 6 s; no reuse epoch finished yet, so its rest is
    # max(the mean of all epochs - 6 s, the update rate x 9 updates), and epoch 3 (refresh) costs 22 s
    epoch, done, per, elapsed, left = parser.running(progress.timestamp("2026-11-25 22:59:25"))
    assert (epoch, done, per, elapsed) == (2, 1, 10, 6.0)
    assert left == pytest.approx(6.0 * 9 + 22.0)
    assert "~44 s left (1 refresh, 1 reuse)" in progress.format_epoch(e)


def E(epoch, kind, seconds):
    return progress.Epoch(epoch, kind, {}, None, seconds)


@pytest.mark.fast
def test_eta_weights_the_epochs_left_by_kind():
    kind = lambda e: "refresh" if progress.is_refresh_epoch(e, 5) else "reuse"  # noqa: E731
    assert [e for e in range(1, 13) if kind(e) == "refresh"] == [1, 6, 11]
    done = [E(1, "refresh", 50.0), E(2, "reuse", 12.0), E(3, "reuse", 10.0)]
    # epochs 4..12: 4, 5, 7, 8, 9, 10, 12 reuse (7 x mean(12, 10) = 77), 6 and 11 refresh (2 x 50)
    secs, left = progress.eta(done, 12, kind)
    assert left == {"reuse": 7, "refresh": 2}
    assert secs == pytest.approx(7 * 11.0 + 2 * 50.0)
    # the first epoch pays warm-up: once a later refresh is in, it leaves the refresh mean
    done += [E(e, "reuse", 11.0) for e in (4, 5)] + [E(6, "refresh", 30.0)]
    secs, left = progress.eta(done, 12, kind)
    assert left == {"reuse": 5, "refresh": 1}
    assert secs == pytest.approx(5 * 11.0 + 1 * 30.0)
    assert progress.kind_means(done) == {"refresh": 30.0, "reuse": 11.0, "*": pytest.approx((30 + 4 * 11) / 5)}
    # a kind with no finished epoch yet costs the mean of all
    secs, left = progress.eta([E(1, "refresh", 40.0)], 3, kind)
    assert (secs, left) == (80.0, {"reuse": 2})
    # unknown total, nothing finished, or the last epoch: nothing / zero left
    assert progress.eta(done, None, kind) == (None, {})
    assert progress.eta([], 12, kind) == (None, {})
    assert progress.eta(done[:1], 1, kind) == (0, {})


@pytest.mark.fast
def test_kinds_without_arch_and_predicted_from_the_refresh_interval():
    p = progress.LogParser()
    p.feed("2026-11-25 22:55:38 | INFO | fairseq_cli.train | {'optimization': {'max_epoch': 20}, "
           "'task': {'arch_refresh_interval': 15}, 'criterion': {'adv_method': r3f}}\n")
    assert (p.total, p.method, p.kind_of(1), p.kind_of(2)) == (20, "r3f", "-", "-")
    p = progress.LogParser()
    p.feed("2026-11-25 22:55:38 | INFO | fairseq_cli.train | {'optimization': {'max_epoch': 40}, "
           "'task': {'arch_refresh_interval': 15}, 'criterion': {'adv_method': arch}}\n")
    assert [e for e in range(1, 41) if p.kind_of(e) == "refresh"] == [1, 16, 31]
    e = E(2, "-", 61.0)
    e.total, e.eta, e.left = 20, 18 * 61.0, {"-": 18}
    assert progress.format_epoch(e).endswith("1m01s  ~18m18s left")
    assert progress.fmt_duration(3 * 3600 + 125) == "3h02m" and progress.fmt_duration(None) == "?"


@pytest.mark.fast
def test_bar_only_on_a_terminal_and_cleared_before_each_epoch_line():
    assert progress.format_bar(3, "reuse", 12, 150, 282, 41.0, 310.0) == \
        "  epoch  3/12 reuse   [##########----------] 150/282 updates  41 s  ~5m10s left"
    assert len(progress.format_bar(3, "reuse", 12, 150, 282, 41.0, 310.0, cols=30)) == 29
    assert "validating" in progress.format_bar(1, "refresh", 3, 2, 2, 30.0, None, validating=True)
    plain = io.StringIO()
    progress.follow(iter(JSON_LOG.splitlines(keepends=True)), plain, bar=False)
    assert "\r" not in plain.getvalue() and plain.getvalue().count("\n") == 1
    tty = io.StringIO()
    progress.follow(iter(JSON_LOG.splitlines(keepends=True)), tty, bar=True)
    out = tty.getvalue()
    assert "\r\033[K  epoch  1/3  refresh [##------------------]  1/10 updates" in out
    assert "\r\033[K  epoch  1/3  refresh  train loss  7.713" in out  # the bar is wiped first
    assert out.endswith("\r\033[K")  # and gone at the end


@pytest.mark.fast
def test_a_failing_run_says_where_it_stopped():
    crash = SIMPLE_LOG.split("2026-11-25 22:56:23 | INFO | fairseq.data.iterators")[0] + (
        "2026-11-25 22:56:23 | INFO | fairseq.trainer | begin training epoch 3\n"
        "Traceback (most recent call last):\n"
        '  File "fairseq_cli/train.py", line 1, in main\n'
        "RuntimeError: CUDA out of memory\n")
    parser, events = feed(crash)
    assert len(epochs(events)) == 2 and not parser.finished
    assert progress.failure_message(1, parser) == \
        "fairseq-train failed (exit 1) in epoch 3, after 2 of 3 epochs: RuntimeError: CUDA out of memory"
    parser, _ = feed(SIMPLE_LOG.split("2026-11-25 22:56:11")[0])
    assert progress.failure_message(-9, parser, "train") == "train failed (killed by SIGKILL) in epoch 1, after 0 of 3 epochs"


def test_run_keeps_the_log_returns_the_exit_status_and_shows_the_tail(tmp_path):
    log = tmp_path / "train.log"
    script = ("import sys; sys.stdout.write(sys.argv[1]); print('RuntimeError: boom', file=sys.stderr); "
              "sys.exit(int(sys.argv[2]))")
    crash = SIMPLE_LOG.split("2026-11-25 22:56:23 | INFO | fairseq.data.iterators")[0]
    out = io.StringIO()
    rc = progress.run([sys.executable, "-c", script, crash, "3"], str(log), out=out, tail=2, what="fairseq-train")
    assert rc == 3
    text = out.getvalue()
    assert text.count("  epoch ") == 2 and "reuse    train loss  8.681" in text
    assert "fairseq-train failed (exit 3), after 2 of 3 epochs: RuntimeError: boom; last lines of" in text
    assert text.endswith("| wall 45\nRuntimeError: boom\n")
    assert log.read_text() == crash + "RuntimeError: boom\n"  # every line, stderr too
    out = io.StringIO()
    assert progress.run([sys.executable, "-c", script, SIMPLE_LOG, "0"], str(log), out=out) == 0
    assert out.getvalue().count("  epoch ") == 3 and "failed" not in out.getvalue()
    assert progress.main(["summary", str(log)]) == 0


@pytest.mark.fast
def test_steps_print_elapsed_and_time_left_by_kind():
    t = [100.0]
    out = io.StringIO()
    s = progress.Steps("quality run", 4, kinds=["none", "arch", "none", "arch"], out=out, clock=lambda: t[0])
    t[0] += 10
    assert s.done("none seed 1") == "quality run 1/4: none seed 1, 10 s; elapsed 10 s, ~30 s left"  # arch unseen: mean of all
    t[0] += 30
    assert s.done() == "quality run 2/4: 30 s; elapsed 40 s, ~40 s left"  # 10 (none) + 30 (arch)
    s.skip()  # reused from disk: done, but not a timing
    t[0] += 31
    assert s.done("x") == "quality run 4/4: x, 31 s; elapsed 1m11s"
    assert out.getvalue().count("\n") == 3
    assert progress.Steps("scale", 2, out=out, eta=False, clock=lambda: 0.0).done("a").endswith("elapsed 0 s")


@pytest.mark.fast
def test_kind_follows_the_first_refresh_epoch():
    """--arch-first-refresh-epoch E: epochs before E are "off", refreshes at E, E + Tc, ..."""
    assert [progress.epoch_kind(e, 2, first=3) for e in range(1, 7)] == \
        ["off", "off", "refresh", "reuse", "refresh", "reuse"]
    assert [progress.epoch_kind(e, 0, first=2) for e in range(1, 5)] == ["off", "refresh", "reuse", "reuse"]
    p = progress.LogParser()
    p.feed("2026-11-25 10:00:00 | INFO | fairseq_cli.train | {'_name': None, 'max_epoch': 4, "
           "'arch_refresh_interval': 2, 'arch_first_refresh_epoch': 2, 'adv_method': arch}")
    assert [p.kind_of(e) for e in range(1, 5)] == ["off", "refresh", "reuse", "refresh"]
    p.feed("2026-11-25 10:00:01 | INFO | fairseq_arch.arch_cache | ARCH epoch 1: off (plain label smoothing)")
    assert p.kinds[1] == "off"
