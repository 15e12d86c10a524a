#!/usr/bin/env python3
"""Live progress of a fairseq-train run: one line per epoch as the epoch ends, the full log kept in a file.

    python3 scripts/progress.py run --log LOG [--tail N] [--bar|--no-bar] -- fairseq-train ARGS...
    python3 scripts/progress.py summary LOG      # the same epoch lines, from a finished (or running) log

`run` starts the command with stdout and stderr going to LOG (every line, as fairseq writes it) and
prints, per epoch:

    epoch  2/12  reuse    train loss  8.681  valid loss  8.462  adv_loss=0.2493   9 s  ~1m40s left | arch_...

the epoch's kind (ARCH `refresh`: fresh ascent, `reuse`: cache only, `off`: before
--arch-first-refresh-epoch; `-` for other methods), its seconds
(from the log's timestamps: training, validation and checkpointing), and the time left: the mean epoch time
of each kind times the epochs of that kind still to come (which epochs refresh follows from
--arch-refresh-interval). Refresh epochs cost more than reuse epochs, hence the split; the first epoch of a
run also pays warm-up, so it leaves a kind's mean once that kind has a later epoch. On a terminal (or with
--bar) a single line below shows the running epoch: updates done / updates per epoch (at fairseq's
--log-interval), seconds, and the time left. The exit status is the command's; when it fails, the last
--tail lines of LOG are printed. Both fairseq log formats (simple, json) are understood.

Parsing is pure (`LogParser.feed`, `eta`, `format_epoch`): tests/test_progress.py feeds it log lines.
"""

import argparse
import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

# a fairseq log line: "2026-11-25 22:56:13 | INFO | train | epoch 001 | loss 8.795 | ..."
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| [A-Z]+ \| ([\w.]+) \| (.*)$")
PIPE_STAT = re.compile(r"\| ([a-z_0-9]+) ([-+0-9.eE]+|inf|nan)(?= \||$)")
COMMA_STAT = re.compile(r"([a-z_0-9]+)=([^,\s]+)")
INNER_SIMPLE = re.compile(r"^epoch (\d+):\s+(\d+) / (\d+)")
SIMPLE_EPOCH = re.compile(r"^epoch (\d+) \|")
ARCH_KIND = re.compile(r"ARCH epoch (\d+): (refresh|reuse|off)")
# the logger of the cache's epoch lines (fairseq_arch.arch_cache: the module's name in the
# logs of runs made before the cache became a package)
ARCH_CACHE_LOGGERS = ("fairseq_arch.cache.arch_cache", "fairseq_arch.arch_cache")
# ARCH's per-epoch counters, printed after the losses (what scripts/log_summary.py printed before)
COUNTERS = ["adv_fwd_per_batch", "arch_fresh", "arch_cached", "arch_rebuilt", "arch_nn_search_s"]


def timestamp(text: str) -> float:
    """Seconds since the epoch of a log timestamp (local time; only differences are used)."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def epoch_kind(epoch: int, interval: int, first: int = 1) -> str:
    """fairseq_arch.cache_math.epoch_mode, without importing torch: "off" before the first refresh
    epoch E, "refresh" at E, E + Tc, E + 2 Tc, ... (only E when Tc = 0), else "reuse"."""
    if epoch < first:
        return "off"
    refresh = epoch == first if interval == 0 else (epoch - first) % interval == 0
    return "refresh" if refresh else "reuse"


def is_refresh_epoch(epoch: int, interval: int, first: int = 1) -> bool:
    return epoch_kind(epoch, interval, first) == "refresh"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _stats(kind: str, body: str) -> Dict[str, str]:
    """The key -> value pairs of a train / valid / train_inner line, json or simple format;
    json's end-of-epoch keys ("train_loss", "valid_loss") lose their prefix."""
    i = body.find("{")
    if i >= 0 and body.rstrip().endswith("}"):
        try:
            rec = json.loads(body[i:])
        except json.JSONDecodeError:
            return {}
        prefix = kind + "_"
        return {(k[len(prefix):] if k.startswith(prefix) else k): str(v) for k, v in rec.items()}
    if kind == "train_inner":
        out = dict(COMMA_STAT.findall(body))
        m = INNER_SIMPLE.match(body)
        if m:
            out.update(epoch=m.group(1), _done=m.group(2), _total=m.group(3))
        return out
    out = dict(PIPE_STAT.findall(" " + body))
    m = SIMPLE_EPOCH.match(body)
    if m:
        out["epoch"] = m.group(1)
    return out


class Epoch:
    """One finished epoch: what its line shows."""

    def __init__(self, epoch, kind, stats, valid_loss, seconds):
        self.epoch, self.kind, self.stats, self.valid_loss, self.seconds = epoch, kind, stats, valid_loss, seconds
        self.total: Optional[int] = None
        self.eta: Optional[float] = None  # seconds left after this epoch (None: unknown)
        self.left: Dict[str, int] = {}  # epochs still to come, by kind

    @property
    def train_loss(self):
        return self.stats.get("loss")

    @property
    def adv_loss(self):
        return self.stats.get("adv_loss")


class LogParser:
    """Follows a fairseq-train log line by line. `feed(line)` returns the events the line completes:
    ("epoch", Epoch) when an epoch's training summary arrives (fairseq 0.12 logs the epoch's validation
    before it), ("inner", epoch, done, per_epoch) at each log interval, ("begin", epoch) and
    ("validate", epoch)."""

    def __init__(self, total_epochs: Optional[int] = None, refresh_interval: Optional[int] = None,
                 method: Optional[str] = None):
        self.total = total_epochs
        self.interval = refresh_interval
        self.first = 1  # --arch-first-refresh-epoch: epochs before it are "off" (plain label smoothing)
        self.method = method  # None until the config line: ARCH if the ARCH cache logs epochs
        self.updates_per_epoch: Optional[int] = None
        self.epoch: Optional[int] = None  # the epoch being trained
        self.epoch_begin: Dict[int, float] = {}
        self.kinds: Dict[int, str] = {}
        self.valid: Dict[int, str] = {}
        self.done: List[Epoch] = []
        self.inner_done = 0
        self.last_line_ts: Optional[float] = None
        self.finished = False  # fairseq said "done training"
        self.error: Optional[str] = None  # the last line that looks like the reason of a failure

    # -- the pure part ---------------------------------------------------------------
    def kind_of(self, epoch: int) -> str:
        """refresh / reuse / "-": as logged by the ARCH cache, or predicted from the refresh interval."""
        if epoch in self.kinds:
            return self.kinds[epoch]
        if self.method == "arch" and self.interval is not None:
            return epoch_kind(epoch, self.interval, self.first)
        if self.method not in (None, "arch") or not self.kinds:
            return "-"
        return "?"

    def feed(self, raw: str):
        line = raw.rstrip("\n")
        events = []
        if line.startswith("Traceback") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            self.error = line.strip()
        m = LINE.match(line)
        if not m:
            return events
        ts, name, body = timestamp(m.group(1)), m.group(2), m.group(3)
        self.last_line_ts = ts
        if name == "fairseq_cli.train" and body.startswith("{") and "'max_epoch'" in body:
            self._config(body)
        elif "grouped total_num_itrs = " in body:
            self.updates_per_epoch = int(body.rsplit("=", 1)[1])
        elif body.startswith("begin training epoch "):
            self.epoch = int(body.split()[-1])
            self.epoch_begin[self.epoch] = ts
            self.inner_done = 0
            events.append(("begin", self.epoch))
        elif name in ARCH_CACHE_LOGGERS and ARCH_KIND.search(body):
            k = ARCH_KIND.search(body)
            self.kinds[int(k.group(1))] = k.group(2)
        elif body.startswith("begin validation") and self.epoch is not None:
            events.append(("validate", self.epoch))
        elif body.startswith("done training"):
            self.finished = True
        elif name == "train_inner":
            st = _stats(name, body)
            epoch = int(float(st.get("epoch", self.epoch or 0)))
            if "_done" in st:
                done, per = int(st["_done"]), int(st["_total"])
            elif "update" in st and self.updates_per_epoch:  # json: update = epoch - 1 + done / per_epoch
                per = self.updates_per_epoch
                done = int(round((float(st["update"]) - (epoch - 1)) * per))
            else:
                return events
            self.inner_done, self.updates_per_epoch = done, per
            events.append(("inner", epoch, done, per))
        elif name == "valid":
            st = _stats(name, body)
            if "epoch" in st and "loss" in st:
                self.valid[int(st["epoch"])] = st["loss"]
        elif name == "train":
            st = _stats(name, body)
            if "epoch" in st:
                events.append(("epoch", self._end_epoch(int(st["epoch"]), st, ts)))
        return events

    def _config(self, body: str):
        def get(key, pattern=r"(\d+)"):
            m = re.search(r"'" + key + r"': " + pattern, body)
            return m.group(1) if m else None

        if self.total is None and get("max_epoch") not in (None, "0"):
            self.total = int(get("max_epoch"))
        if self.interval is None and get("arch_refresh_interval") is not None:
            self.interval = int(get("arch_refresh_interval"))
        if get("arch_first_refresh_epoch") is not None:
            self.first = int(get("arch_first_refresh_epoch"))
        if self.method is None:  # an enum: printed without quotes
            self.method = get("adv_method", r"'?(\w+)'?") or "none"

    def _end_epoch(self, epoch: int, st: Dict[str, str], ts: float) -> Epoch:
        prev = self.done[-1] if self.done else None
        if epoch in self.epoch_begin:
            seconds = ts - self.epoch_begin[epoch]
        elif prev is not None and "wall" in st and "wall" in prev.stats:
            seconds = float(st["wall"]) - float(prev.stats["wall"])
        else:
            seconds = float(st["train_wall"]) if "train_wall" in st else None
        e = Epoch(epoch, self.kind_of(epoch), st, self.valid.get(epoch), seconds)
        self.done.append(e)
        e.total = self.total
        e.eta, e.left = eta(self.done, self.total, self.kind_of)
        self.epoch, self.inner_done = None, 0
        return e

    def running(self, now: float):
        """(epoch, done, per_epoch, seconds into the epoch, seconds left in the whole run) of the epoch
        being trained, for the progress bar; None between epochs. `now` is in log time."""
        if self.epoch is None or self.epoch not in self.epoch_begin:
            return None
        elapsed = max(0.0, now - self.epoch_begin[self.epoch])
        done, per = self.inner_done, self.updates_per_epoch
        later, _ = eta(self.done, self.total, self.kind_of, after=self.epoch)
        # this epoch: the rest of its kind's mean, or more when its updates are slower than that
        # (the rate leaves out validation and checkpointing, the mean does not)
        means = kind_means(self.done)
        mean = means.get(self.kind_of(self.epoch), means.get("*"))
        this = None if mean is None else max(mean - elapsed, 0.0)
        if done and per:
            rate = elapsed / done * max(per - done, 0)
            this = rate if this is None else max(this, rate)
        left = None if this is None or later is None else this + later
        return self.epoch, done, per, elapsed, left


def kind_means(done: List[Epoch]) -> Dict[str, float]:
    """Mean seconds per epoch of each kind ("*": all kinds). A run's first epoch pays warm-up
    (threads, caches, first batches): it counts only while its kind has no later epoch."""
    by = collections.defaultdict(list)
    for i, e in enumerate(done):
        if e.seconds is not None:
            by[e.kind].append((i, e.seconds))
    out, kept = {}, []
    for kind, xs in by.items():
        if len(xs) > 1 and xs[0][0] == 0:
            xs = xs[1:]
        out[kind] = sum(s for _, s in xs) / len(xs)
        kept += [s for _, s in xs]
    if kept:
        out["*"] = sum(kept) / len(kept)
    return out


def eta(done: List[Epoch], total: Optional[int], kind_of, after: Optional[int] = None):
    """(seconds left, {kind: epochs left}) after epoch `after` (default: the last finished one):
    each epoch still to come costs the mean of the finished epochs of its kind, or of all kinds
    when none of its kind has finished yet. (None, {}) when the total is unknown or nothing finished."""
    if not total or not done:
        return None, {}
    last = done[-1].epoch if after is None else after
    means = kind_means(done)
    if "*" not in means:
        return None, {}
    left = collections.Counter(kind_of(e) for e in range(last + 1, total + 1))
    return sum(n * means.get(k, means["*"]) for k, n in left.items()), dict(left)


def _head(epoch: int, total: Optional[int], kind: str) -> str:
    width = max(2, len(str(total or epoch)))
    t = f"/{total}" if total else ""
    return f"  epoch {epoch:{width}d}{t:<{width + 1}} {kind:<7}"


def format_epoch(e: Epoch) -> str:
    """One epoch's line (the README's columns, with the epoch's kind, seconds and the time left)."""
    head = _head(e.epoch, e.total, e.kind)
    losses = f"train loss {e.train_loss or '?':>6}  valid loss {e.valid_loss or '?':>6}"
    if e.adv_loss is not None:
        losses += f"  adv_loss={e.adv_loss}"
    if e.total and e.epoch >= e.total:
        left = "done"
    elif e.eta is None:
        left = "? left"
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(e.left.items()) if k != "-")
        left = f"~{fmt_duration(e.eta)} left" + (f" ({kinds})" if kinds else "")
    counters = " ".join(f"{k}={e.stats[k]}" for k in COUNTERS if k in e.stats)
    return f"{head}  {losses}  {fmt_duration(e.seconds):>6}  {left}" + (f" | {counters}" if counters else "")


def format_bar(epoch: int, kind: str, total: Optional[int], done: int, per: Optional[int], elapsed: float,
               left: Optional[float], cols: int = 80, validating: bool = False) -> str:
    """The in-epoch line: "  epoch  3/12  refresh [#####-----]  150/282 updates  41 s  ~5m10s left"."""
    head = _head(epoch, total, kind)
    if per:
        n = 20
        fill = min(n, int(n * done / per)) if per else 0
        bar = f"[{'#' * fill}{'-' * (n - fill)}] {done:>{len(str(per))}}/{per} updates"
    else:
        bar = f"{done} updates" if done else "starting"
    if validating:
        bar += ", validating"
    tail = f"  {fmt_duration(elapsed)}" + (f"  ~{fmt_duration(left)} left" if left is not None else "")
    return (head + " " + bar + tail)[: max(cols - 1, 10)]


def failure_message(returncode: int, parser: LogParser, what: str = "fairseq-train") -> str:
    """What a failed run did before it stopped, e.g. "fairseq-train failed (exit 1) in epoch 2,
    after 1 of 3 epochs: RuntimeError: ..."."""
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit {returncode}"
    where = ""
    if parser.epoch is not None:
        where = f" in epoch {parser.epoch}"
    n = len(parser.done)
    of = f" of {parser.total}" if parser.total else ""
    where += f", after {n}{of} epoch{'s' if n != 1 else ''}"
    return f"{what} failed ({how}){where}" + (f": {parser.error}" if parser.error else "")


class Steps:
    """Progress of a loop of steps (benchmark rounds, runs, scales): `done(detail)` prints
    "<what> 3/15: <detail>, 4.2 s; elapsed 12 s, ~40 s left". `kinds` (one per step) prices the steps
    left by the mean of the finished steps of their kind (the mean of all for a kind not seen yet);
    a `skip()`ped step (a result reused from disk) counts as done but not in the means."""

    def __init__(self, what: str, total: int, kinds: Optional[List[str]] = None, out=None, eta: bool = True,
                 clock=time.perf_counter):
        self.what, self.total, self.kinds, self.out, self.with_eta, self.clock = what, total, kinds, out, eta, clock
        self.i = 0
        self.t0 = self.last = clock()
        self.seconds: Dict[str, List[float]] = collections.defaultdict(list)

    def kind(self, i: int) -> str:
        return self.kinds[i] if self.kinds else "*"

    def left(self) -> Optional[float]:
        every = [s for xs in self.seconds.values() for s in xs]
        if not every:
            return None
        mean = sum(every) / len(every)
        means = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        return sum(means.get(self.kind(i), mean) for i in range(self.i, self.total))

    def skip(self):
        self.i += 1
        self.last = self.clock()

    def done(self, detail: str = "") -> str:
        now = self.clock()
        took = now - self.last
        self.seconds[self.kind(self.i)].append(took)
        self.i += 1
        self.last = now
        line = f"{self.what} {self.i}/{self.total}: " + (f"{detail}, " if detail else "") + f"{fmt_duration(took)}; " \
               f"elapsed {fmt_duration(now - self.t0)}"
        if self.with_eta and self.i < self.total:
            line += f", ~{fmt_duration(self.left())} left"
        out = self.out or sys.stdout
        out.write(line + "\n")
        out.flush()
        return line


# -- running and following ------------------------------------------------------------

class Printer:
    """Epoch lines to `out`, and on a terminal one line that is redrawn in place below them."""

    def __init__(self, out, bar: bool):
        self.out, self.bar, self.shown, self.last = out, bar, False, None

    def line(self, text: str):
        self.clear()
        self.out.write(text + "\n")
        self.out.flush()

    def status(self, text: str):
        if self.bar and not (self.shown and text == self.last):
            self.last = text
            self.out.write("\r\033[K" + text)
            self.out.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()
            self.shown = False


def follow(lines, out=sys.stdout, bar: Optional[bool] = None, parser: Optional[LogParser] = None,
           tick: float = 1.0):
    """Feed `lines` (an iterator that may yield None when nothing arrived for `tick` seconds) to a
    parser and print what it finds; returns the parser."""
    parser = parser or LogParser()
    bar = out.isatty() if bar is None else bar
    p = Printer(out, bar)
    validating = False
    # the log's clock: the bar's seconds advance with the wall clock between log lines
    offset = None
    for raw in lines:
        if raw is not None:
            for ev in parser.feed(raw):
                if ev[0] == "epoch":
                    validating = False
                    p.line(format_epoch(ev[1]))
                elif ev[0] == "validate":
                    validating = True
                elif ev[0] == "begin":
                    validating = False
            if parser.last_line_ts is not None:
                offset = parser.last_line_ts - time.time() if offset is None else max(offset, parser.last_line_ts - time.time())
        if bar and offset is not None:
            run = parser.running(time.time() + offset)
            if run is not None:
                epoch, done, per, elapsed, left = run
                cols = shutil.get_terminal_size((100, 20)).columns
                p.status(format_bar(epoch, parser.kind_of(epoch), parser.total, done, per, elapsed, left, cols,
                                    validating))
            else:
                p.clear()
    p.clear()
    return parser


def _queue_lines(q: "queue.Queue", tick: float):
    while True:
        try:
            item = q.get(timeout=tick)
        except queue.Empty:
            yield None
            continue
        if item is StopIteration:
            return
        yield item


def console_cmd(cmd: List[str]) -> List[str]:
    """`cmd` with a bare console-script name (fairseq-train, ...) replaced by the one installed next
    to the running Python, when there is one: the environment that runs this script, not whatever
    PATH finds first (another environment's fairseq would run without this one's packages)."""
    cmd = list(cmd)
    if cmd and os.sep not in cmd[0]:
        mine = os.path.join(os.path.dirname(sys.executable), cmd[0])
        if os.path.exists(mine):
            cmd[0] = mine
    return cmd


def run(cmd: List[str], log_path: str, out=sys.stdout, bar: Optional[bool] = None, tail: int = 30,
        env: Optional[dict] = None, append: bool = False, what: Optional[str] = None) -> int:
    """Run `cmd` with its stdout + stderr written line by line to `log_path`, print the epoch lines
    (and the bar) to `out`; return its exit status. On failure: a one-line reason and the log's tail."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    bar = out.isatty() if bar is None else bar
    q: "queue.Queue" = queue.Queue()
    try:
        proc = subprocess.Popen(console_cmd(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", bufsize=1)
    except OSError as e:  # not found / not executable: what a shell says, with its status
        out.write(f"{what or cmd[0]}: cannot run {cmd[0]}: {e.strerror}\n")
        out.flush()
        return 127 if isinstance(e, FileNotFoundError) else 126
    log = open(log_path, "a" if append else "w")

    def reader():
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                q.put(line)
        finally:
            q.put(StopIteration)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    parser = LogParser()
    try:
        follow(_queue_lines(q, 1.0), out, bar, parser)
        rc = proc.wait()
    except KeyboardInterrupt:
        # the terminal sent SIGINT to the whole group: let fairseq stop and say so in its log
        try:
            rc = proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            rc = proc.wait()
        rc = rc or 130
    t.join(timeout=5)
    log.close()
    if rc != 0:
        out.write(failure_message(rc, parser, what or os.path.basename(cmd[0])) + f"; last lines of {log_path}:\n")
        with open(log_path, errors="replace") as f:
            out.writelines(collections.deque(f, maxlen=tail))
        out.flush()
    return rc


def summary(log_path: str, out=sys.stdout) -> LogParser:
    """The epoch lines of a log written earlier (no bar)."""
    with open(log_path, errors="replace") as f:
        return follow(iter(f), out, bar=False)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="run a command (after --), log to --log, print epoch lines")
    r.add_argument("--log", required=True)
    r.add_argument("--append", action="store_true", help="append to the log (a resumed run)")
    r.add_argument("--tail", type=int, default=30, help="log lines shown when the command fails")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--bar", dest="bar", action="store_true", default=None, help="in-epoch line (default: on a terminal)")
    g.add_argument("--no-bar", dest="bar", action="store_false")
    s = sub.add_parser("summary", help="the epoch lines of a finished log")
    s.add_argument("log")
    a = ap.parse_args(argv)
    if a.what == "summary":
        summary(a.log)
        return 0
    if not cmd:
        ap.error("run: give the command after --")
    return run(cmd, a.log, bar=a.bar, tail=a.tail, append=a.append)


if __name__ == "__main__":
    sys.exit(main())
