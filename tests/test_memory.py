"""Peak memory of the adversarial methods: the clean CE's early backward
(fairseq_arch/early_backward.py, armed by arch_translation's train_step).

For arch, smart and r3f the teacher is detached, so the clean CE can be backpropagated
before the perturbed forward: the clean graph is freed before the perturbed one is
built. It must change nothing but memory: the same update (fairseq's Trainer, with and
without --update-freq 2), the same logged loss, the same gradients and the same number
of all-reduces under data parallelism (torch DDP and legacy_ddp on gloo), the skipped
(non-finite) regulariser still training on the clean CE; and the peak must really drop
(counted exactly by the cost benchmark's LiveTensorBytes).

Tolerances: bit-identical gradients and parameters, but under torch DDP with --update-freq 2.
A batch's gradient is A (clean CE) + B (KL), the same float sum whichever backward comes
first; the gradients of the update's earlier batches G are set aside and added back,
G + (A + B) as before (fairseq_arch/early_backward.py, "Rounding"). Under torch DDP the
all-reduce reads .grad inside the KL's backward, so G stays and the sum is ((G + A) + B):
float32 rounding. There gradients agree per tensor to |diff| <= 1e-6 x its largest entry
(~8 ulps; measured <= 1.7e-7) and parameters after Adam's first step lr g / (|g| + eps)
to 1e-6 = lr / 5000 (measured <= 8e-8; a lost or doubled CE gradient moves them by ~lr).
"""

import contextlib
import os
import socket
import time
import traceback

import pytest
import torch

import fairseq_arch.methods.ascent as ascent_mod
from benchmarks.cost import LiveTensorBytes
from fairseq_arch import early_backward
from fairseq_arch.perturbation import Teacher

from . import utils

LR = 0.005
GRAD_RTOL = 1e-6  # of each gradient tensor's largest entry (torch DDP, update-freq 2 only)
PARAM_ATOL = 1e-6  # after one Adam step at LR (torch DDP, update-freq 2 only)
DDP_TIMEOUT = 400  # seconds for both ranks (measured: ~40 s per test on 2 idle cores)


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def count_early_calls(monkeypatch, method: str = "__call__"):
    """The losses the criterion passed to the early backward's ``method`` (``__call__``: the
    clean CE; ``part``: a chunk of the regulariser): the path under test must really run, a
    test of 'the same update' passes trivially if it never does."""
    calls = []
    real = getattr(early_backward.EarlyCleanBackward, method)

    def spy(self, loss):
        calls.append(float(loss.detach()))
        return real(self, loss)

    monkeypatch.setattr(early_backward.EarlyCleanBackward, method, spy)
    return calls


def trainer_update(data_dir, save_dir, method, early, freq=1, reuse=False, extra=()):
    """One update of fairseq's Trainer (zero_grad, the task's train_step per batch with
    no_sync accumulation, gradient scaling, Adam) on the first ``freq`` batches; ARCH on
    a refresh epoch, or on a reuse epoch after a refresh epoch filled the cache."""
    from fairseq.trainer import Trainer

    cfg, task, model, crit = utils.build_components(
        data_dir, ["--adv-method", method, "--adv-steps", "2", "--arch-refresh-interval", "2",
                   "--optimizer", "adam", "--lr", str(LR), *extra], save_dir=str(save_dir))
    task.early_clean_backward = early
    batches = utils.batches(task)
    trainer = Trainer(cfg, task, model, crit)
    task.begin_epoch(1, trainer.model)
    if reuse:
        model.train()
        for b in batches:  # fills the cache; no update
            crit(model, b)
        task.begin_epoch(2, trainer.model)
    log = trainer.train_step(batches[:freq])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return params, grads, log


def assert_same_update(a, b, exact):
    (pa, ga, la), (pb, gb, lb) = a, b
    assert sorted(pa) == sorted(pb)
    for k in ("loss", "ls_loss", "nll_loss", "adv_loss"):
        assert la[k] == lb[k], f"logged {k}: {la[k]} with the early backward, {lb[k]} without"
    for n in pa:
        if exact:
            assert torch.equal(ga[n], gb[n]), f"{n}: gradient differs (max {(ga[n] - gb[n]).abs().max():.3g})"
            assert torch.equal(pa[n], pb[n]), f"{n}: parameter differs (max {(pa[n] - pb[n]).abs().max():.3g})"
        else:
            scale = gb[n].abs().max().item()
            assert (ga[n] - gb[n]).abs().max().item() <= GRAD_RTOL * scale, n
            assert (pa[n] - pb[n]).abs().max().item() <= PARAM_ATOL, n


@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("method,reuse", [("arch", False), ("arch", True), ("smart", False), ("r3f", False)],
                         ids=["arch-refresh", "arch-reuse", "smart", "r3f"])
def test_early_backward_gives_the_same_update(data_dir, tmp_path, monkeypatch, method, reuse, freq):
    calls = count_early_calls(monkeypatch)
    early = trainer_update(data_dir, tmp_path / "early", method, True, freq, reuse)
    assert len(calls) == freq, f"the early backward ran {len(calls)} times for {freq} batches"
    joint = trainer_update(data_dir, tmp_path / "joint", method, False, freq, reuse)
    assert len(calls) == freq, "the switch (task.early_clean_backward = False) did not turn it off"
    assert_same_update(early, joint, exact=True)


@pytest.mark.parametrize("method,extra", [("none", []), ("freelb", []), ("rdrop", []), ("arch", ["--adv-lambda", "0"]),
                                          ("arch", ["--arch-first-refresh-epoch", "2"])],
                         ids=["none", "freelb", "rdrop", "lambda0", "arch-off-epoch"])
def test_not_armed_where_gradients_flow_through_every_forward_or_there_is_no_kl(data_dir, tmp_path, monkeypatch,
                                                                               method, extra):
    calls = count_early_calls(monkeypatch)
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", method, *extra], save_dir=str(tmp_path))
    task.begin_epoch(1, model)
    opt = _Backward()
    task.train_step(utils.batches(task)[0], model, crit, opt, 0)
    assert calls == [] and opt.calls == 1
    assert getattr(crit, "early_backward", None) is None


class _Backward:
    """The optimizer interface a task's train_step uses."""

    def __init__(self):
        self.calls = 0

    def backward(self, loss):
        self.calls += 1
        loss.backward()


def test_skipped_regulariser_still_trains_on_the_clean_ce(data_dir, tmp_path, monkeypatch):
    """A non-finite KL is dropped (criterion): with the early backward the CE's gradient
    is already in .grad and the trainer's backward has nothing left to do; the update is
    the plain CE's, bit for bit as without the early backward."""
    real = Teacher.divergence
    monkeypatch.setattr(Teacher, "divergence", lambda *a, **k: real(*a, **k) * float("inf"))
    calls = count_early_calls(monkeypatch)
    early = trainer_update(data_dir, tmp_path / "early", "arch", True, reuse=True)
    joint = trainer_update(data_dir, tmp_path / "joint", "arch", False, reuse=True)
    assert len(calls) == 1 and early[2]["adv_skipped"] == 1
    assert all(g.abs().sum() > 0 for n, g in early[1].items() if "embed_positions" not in n), "no CE gradient"
    assert_same_update(early, joint, exact=True)


def test_dummy_batch_contributes_zero_gradient(data_dir, tmp_path, monkeypatch):
    calls = count_early_calls(monkeypatch)
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "arch"], save_dir=str(tmp_path))
    task.begin_epoch(1, model)
    model.zero_grad(set_to_none=True)
    task.train_step(utils.batches(task)[0], model, crit, _Backward(), 0, ignore_grad=True)
    assert len(calls) == 1
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_armed_but_not_called_is_an_error(data_dir, tmp_path, monkeypatch):
    """The task arms the early backward from the criterion's settings; if its forward took
    another path (here: FreeLB, armed by force), the trainer's backward would miss the
    DDP synchronisation the early backward hands back: an error, not a silent update."""
    monkeypatch.setattr(early_backward, "detached_teacher_step", lambda criterion: True)
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "freelb"], save_dir=str(tmp_path))
    task.begin_epoch(1, model)
    with pytest.raises(RuntimeError, match="called it 0 times"):
        task.train_step(utils.batches(task)[0], model, crit, _Backward(), 0)


# -- peak memory -------------------------------------------------------------------------


@pytest.mark.fast
def test_live_tensor_bytes_counts_allocations_not_views():
    mb = 2**20
    mem = LiveTensorBytes()
    w = torch.ones(256, 1024, requires_grad=True)  # 1 MiB, made outside: never counted
    with mem:
        a = torch.ones(512, 1024)  # 2 MiB
        v = a.t()  # a view: no allocation
        a.add_(1)  # in place: none
        w_t = w.t()  # a view of a tensor made outside: none
        assert (mem.now, mem.peak) == (2 * mb, 2 * mb)
        b = a * 2  # 2 MiB
        assert (mem.now, mem.peak) == (4 * mb, 4 * mb)
        del a  # v still holds a's storage
        assert mem.now == 4 * mb
        del v  # now it is freed
        assert mem.now == 2 * mb
        # a 1 MiB product (saved by nothing: freed after the sum), then in backward
        # 1 MiB for w.grad (the 4-byte sum comes and goes): never above the 4 MiB of before
        (w_t.t() * 3).sum().backward()
        assert mem.now == 3 * mb and w.grad is not None
        assert mem.peak == 4 * mb
        del b
    assert mem.now == mb  # w.grad, made inside
    del w, w_t  # (the view keeps w, and so its .grad, alive)
    assert mem.now == 0


def largest_batch_peak(task, model, crit, batches):
    """(the most tensor bytes alive at once in the task's train_step on the largest of
    ``batches``, that step's logging output), gradients allocated inside the step."""
    batch = max(batches, key=lambda b: b["net_input"]["prev_output_tokens"].numel())
    model.zero_grad(set_to_none=True)
    mem = LiveTensorBytes()
    with mem:
        loss, _, log = task.train_step(batch, model, crit, _Backward(), 0)
        del loss
    return mem.peak, dict(log, sentences=len(batch["id"]))


@pytest.mark.parametrize("method,reuse", [("arch", False), ("arch", True), ("smart", False), ("r3f", False)],
                         ids=["arch-refresh", "arch-reuse", "smart", "r3f"])
def test_early_backward_lowers_the_peak(data_dir, tmp_path, method, reuse):
    """The most tensor bytes alive at once in one train_step, counted exactly (not RSS):
    with the early backward at most 0.75 x the joint backward's (measured 0.66 on this
    toy model: the clean graph is gone before the perturbed one is built)."""
    peak = {}
    for early in (True, False):
        _, task, model, crit = utils.build_components(
            data_dir, ["--adv-method", method, "--adv-steps", "2", "--arch-refresh-interval", "2"],
            save_dir=str(tmp_path / str(early)))
        task.early_clean_backward = early
        batches = utils.batches(task)
        task.begin_epoch(1, model)
        model.train()
        if reuse:
            for b in batches:
                crit(model, b)
            task.begin_epoch(2, model)
        peak[early], _ = largest_batch_peak(task, model, crit, batches)
    ratio = peak[True] / peak[False]
    print(f"{method}{' reuse' if reuse else ''}: peak {peak[True] / 2**20:.2f} MiB with the early backward, "
          f"{peak[False] / 2**20:.2f} MiB joint (x{ratio:.3f})")
    assert ratio <= 0.75, f"peak with the early backward is x{ratio:.3f} the joint backward's"


@pytest.mark.parametrize("method", ["smart", "arch"])
def test_ascent_with_frozen_parameters_finds_the_same_delta(data_dir, tmp_path, monkeypatch, method):
    """The ascent's forwards run with requires_grad off on the parameters (autograd keeps
    less): the perturbations are bit for bit those found with the parameters trainable,
    the parameters are trainable again afterwards, also when the ascent raises, and no
    parameter gradient is touched."""
    _, task, model, crit = utils.build_components(
        data_dir, ["--adv-method", method, "--adv-steps", "2"], save_dir=str(tmp_path))
    task.begin_epoch(1, model)
    model.train()
    batch = utils.batches(task)[0]
    net_input = batch["net_input"]
    masks = {"source": net_input["src_tokens"].ne(1), "target": net_input["prev_output_tokens"].ne(1)}
    with torch.no_grad():
        lprobs, target = crit.lprobs_fp32(model, model(**net_input), batch)
    teacher = crit.teacher(lprobs, target, batch)
    frozen_seen = []
    real_forward = crit.perturbed_forward

    def forward(m, *a, **k):
        frozen_seen.append(not any(p.requires_grad for p in m.parameters()))
        return real_forward(m, *a, **k)

    monkeypatch.setattr(crit, "perturbed_forward", forward)

    def ascent():
        return crit.fresh_perturbation(model, batch, teacher, masks, 1)

    frozen = ascent()
    assert frozen_seen == [True, True]
    monkeypatch.setattr(ascent_mod, "frozen_parameters", lambda m: contextlib.nullcontext())
    trainable = ascent()
    assert frozen_seen[2:] == [False, False]
    for side in frozen:
        assert torch.equal(frozen[side], trainable[side]), side
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    monkeypatch.undo()
    monkeypatch.setattr(crit, "perturbed_forward", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ascent()
    assert all(p.requires_grad for p in model.parameters())


# -- data parallel on gloo ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, port, data_dir, root, scenarios):
    """One rank: for each (name, backend, early, skip[, extra flags]) scenario a fresh task/model/Trainer
    (same seed), one update of two batches (rank r: batches 2r, 2r+1), then its
    gradients, parameters and the number of DDP bucket all-reduces to <root>/r<rank>-*.pt."""
    out = os.path.join(root, f"r{rank}.err")
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist
        import torch.nn.parallel as parallel
        import fairseq.models.distributed_fairseq_model as dfm
        from fairseq.trainer import Trainer

        utils.quiet_logs()

        class CpuDDP(parallel.DistributedDataParallel):
            # fairseq passes device_ids=[device_id], which torch refuses for CPU modules
            # (as tests/test_distributed.py's launcher); the reducer is the real one
            def __init__(self, module, device_ids=None, output_device=None, **kwargs):
                super().__init__(module, **kwargs)

        dfm.DistributedDataParallel = CpuDDP
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
        parts = []  # chunks of the regulariser backpropagated early (--adv-chunks, tests/test_chunks.py)
        real_part = early_backward.EarlyCleanBackward.part
        early_backward.EarlyCleanBackward.part = lambda self, loss: (parts.append(1), real_part(self, loss))[1]
        for name, backend, early, skip, *extra in scenarios:
            parts.clear()
            cfg, task, model, crit = utils.build_components(data_dir, [
                "--adv-method", "arch", "--adv-steps", "2", "--optimizer", "adam", "--lr", str(LR),
                "--distributed-world-size", "2", "--distributed-rank", str(rank), "--ddp-backend", backend,
                "--distributed-backend", "gloo", *(extra[0] if extra else [])], save_dir=os.path.join(root, name))
            task.early_clean_backward = early
            batches = utils.batches(task, max_tokens=300)
            trainer = Trainer(cfg, task, model, crit)
            reductions = {"buckets": 0}
            if backend == "pytorch_ddp":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def counting_hook(state, bucket):
                    state["buckets"] += 1
                    return allreduce_hook(None, bucket)

                ddp = trainer.model.module
                assert isinstance(ddp, CpuDDP), type(ddp)
                ddp.register_comm_hook(reductions, counting_hook)
            real = Teacher.divergence
            if skip and rank == 1:  # a non-finite ascent on rank 1 only: its regulariser is skipped
                Teacher.divergence = lambda *a, **k: real(*a, **k) * float("nan")
            task.begin_epoch(1, trainer.model)
            log = trainer.train_step(batches[2 * rank:2 * rank + 2])
            Teacher.divergence = real
            torch.save({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                        "buckets": reductions["buckets"], "skipped": log.get("adv_skipped"), "parts": len(parts)},
                       os.path.join(root, f"r{rank}-{name}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(out, "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(data_dir, root, scenarios):
    """Both ranks through ``scenarios``; {(rank, name): saved results}."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, data_dir, str(root), scenarios)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DDP_TIMEOUT  # one deadline: a hung rank 1 must not wait behind rank 0's
    try:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errs = [open(root / f"r{r}.err").read() for r in range(2) if (root / f"r{r}.err").exists()]
    assert not errs and all(p.exitcode == 0 for p in procs), (
        f"exit codes {[p.exitcode for p in procs]} (a hang = a rank missing an all-reduce)\n" + "\n".join(errs))
    return {(r, name): torch.load(root / f"r{r}-{name}.pt") for r in range(2) for name, *_ in scenarios}


def assert_same_reduced_update(res, scenarios):
    """Early vs joint backward, each rank: the same number of DDP bucket all-reduces, the
    same gradients and parameters (bit for bit under legacy_ddp; torch DDP: the update-freq
    2 tolerances), and both ranks equal (the gradients were reduced)."""
    for name, backend, early, skip in scenarios:
        if not early:
            continue
        joint = name.replace("-early", "-joint")
        for r in range(2):
            a, b = res[(r, name)], res[(r, joint)]
            assert a["buckets"] == b["buckets"], f"{name} rank {r}: {a['buckets']} bucket all-reduces, joint {b['buckets']}"
            for n in a["grads"]:
                if backend == "legacy_ddp":
                    assert torch.equal(a["grads"][n], b["grads"][n]) and torch.equal(a["params"][n], b["params"][n]), \
                        (name, r, n)
                scale = b["grads"][n].abs().max().item()
                assert (a["grads"][n] - b["grads"][n]).abs().max().item() <= GRAD_RTOL * scale, (name, r, n)
                assert (a["params"][n] - b["params"][n]).abs().max().item() <= PARAM_ATOL, (name, r, n)
                assert torch.equal(a["grads"][n], res[(1 - r, name)]["grads"][n]), (name, n)
        if backend == "pytorch_ddp":
            assert res[(0, name)]["buckets"] > 0, "the counting comm hook never ran"


def ddp_scenarios(backends, skip):
    return [(f"{b}-{'early' if e else 'joint'}{'-skip' if skip else ''}", b, e, skip)
            for b in backends for e in (True, False)]


def test_data_parallel_gradients_and_all_reduces_unchanged(data_dir, tmp_path):
    """2 ranks on gloo, two batches per rank per update (fairseq's no_sync on the first).
    torch DDP reduces in backward hooks, armed at forward time: the clean forward and the
    early backward run inside no_sync, so the gradients are all-reduced once, at the KL's
    backward: as many bucket all-reduces as with the joint backward (one more backward
    outside no_sync would double them), the same gradients. legacy_ddp (the trainer
    all-reduces explicitly): the same gradients."""
    sc = ddp_scenarios(("pytorch_ddp", "legacy_ddp"), skip=False)
    assert_same_reduced_update(run_ranks(data_dir, tmp_path, sc), sc)


def test_data_parallel_rank_with_a_skipped_regulariser(data_dir, tmp_path):
    """torch DDP, rank 1's regulariser skipped (non-finite ascent) in both its batches:
    its CE gradient is in .grad after the early backward and there is no KL backward, yet
    it must join rank 0's all-reduce (else rank 0 hangs): a zero-weighted forward/backward
    through the wrapper does; the same update as the joint backward's."""
    sc = ddp_scenarios(("pytorch_ddp",), skip=True)
    res = run_ranks(data_dir, tmp_path, sc)
    assert_same_reduced_update(res, sc)
    assert all(res[(r, name)]["skipped"] == 2 for r in range(2) for name, *_ in sc), "rank 1 did not skip its 2 batches"
