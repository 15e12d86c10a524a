"""Where quality runs train (``--device``) and how many at once (``--jobs``).

Each run is its own fairseq-train and fairseq-generate processes, so running N at once needs
no more than N threads here that start them and wait. The threads only wait: results are
written and the report rewritten in the calling thread, one run at a time, as runs finish.

A GPU run of a seed is not the same experiment as a CPU run of that seed (other dropout
masks, other kernels), so GPU runs form a suite of their own (``<suite>-cuda``), paired only
among themselves."""

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """Where a run's processes compute, and with how many threads each."""

    device: str = "cpu"
    threads: Optional[int] = None  # OMP_NUM_THREADS of every process; None: the caller's environment

    def __post_init__(self):
        if self.device not in DEVICES:
            raise SystemExit(f"quality: --device {self.device!r}: one of {', '.join(DEVICES)}")

    @property
    def flags(self) -> List[str]:
        """fairseq-train / fairseq-generate flags (without --cpu fairseq uses the GPU)."""
        return ["--cpu"] if self.device == "cpu" else []

    def env(self, base: dict) -> dict:
        env = dict(base, PYTHONWARNINGS="ignore")
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def name(self) -> str:
        """What a run's JSON records as its device."""
        if self.device == "cpu":
            return "cpu"
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("quality: --device cuda, but torch sees no GPU here")
        return torch.cuda.get_device_name(0)


def suite_for(suite: str, device: str) -> str:
    """The results folder of ``suite``'s runs on ``device``: CPU runs keep the suite's name."""
    return suite if device == "cpu" else f"{suite}-{device}"


def placement_of(args) -> Placement:
    """``--device`` and ``--jobs``: with several jobs and no OMP_NUM_THREADS of the user's,
    each process gets its share of the cores (two runs with the default threads on 2 cores ran
    5-8x slower than with one each)."""
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise SystemExit(f"quality: --jobs {jobs}: at least 1")
    threads = None
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    return Placement(getattr(args, "device", "cpu"), threads)


Run = Tuple[str, int]  # (variant, seed)


def run_all(pending: List[Run], jobs: int, start: Callable[[str, int], dict],
            finished: Callable[[str, int, dict], None], after: Callable[[Run], Optional[Run]] = lambda r: None):
    """``start(name, seed)`` for every pending run, ``jobs`` at a time, in plan order;
    ``finished(name, seed, result)`` in this thread as each one ends. ``after(run)``: a run that
    must finish before ``run`` starts (the same seed's ``none`` for the pretrained-neighbour
    variant), or None. A failed run stops new starts; the runs already going finish and are
    kept, then the first failure is raised."""
    if jobs == 1:
        for name, seed in pending:
            finished(name, seed, start(name, seed))
        return
    futures = {}

    def job(run):
        dep = after(run)
        if dep in futures:  # started earlier in plan order, so no wait on a job that cannot start
            futures[dep].result()
        return start(*run)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for run in pending:
            futures[run] = pool.submit(job, run)
        running, failure = set(futures.values()), None
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                run = next(r for r, f in futures.items() if f is fut)
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    failure = failure or fut.exception()
                    for f in running:
                        f.cancel()  # not started yet: never starts
                    continue
                finished(*run, fut.result())
    if failure is not None:
        raise failure
