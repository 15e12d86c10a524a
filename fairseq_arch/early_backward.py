"""The clean CE's backward before the perturbed forward, for peak memory.

For arch, smart and r3f the loss is ``CE(f(x)) + lambda * KL(stopgrad f(x) || f(x + delta))``:
the teacher f(x) is detached, so the CE's parameter gradient is final as soon as the
clean forward is done. Backpropagating the CE then (instead of one backward of the
total at the end) frees the clean graph before the ascent and the perturbed forward
build theirs, so the two graphs are never alive together.

``arch_translation``'s ``train_step`` arms an :class:`EarlyCleanBackward` for such a
step; the criterion calls it on the clean loss right after computing the teacher and
returns ``loss.detach() + lambda * KL`` (the total's value, the KL's gradient) for the
trainer's backward. Data parallel: gradients must still be all-reduced once per update,
at the trainer's backward. The clean forward and the early backward therefore run
inside the wrapper's ``no_sync()`` (torch DDP decides at forward time whether the next
backward all-reduces; fairseq's legacy DDP all-reduces explicitly after the last
backward anyway), which is exited before the perturbed forward. FreeLB, R-Drop and
``none`` are not armed: their gradients flow through every forward. The logged
forward/backward counts do not change: the two backward passes traverse the two graphs
the one backward of the total loss traversed (Table 1 counts it as one backward).

Rounding: a batch's gradient is the sum of the clean part A and the KL part B. Alone in
an update it is A + B either way (bit for bit). With --update-freq, gradients of earlier
batches G are in .grad: the joint backward adds (A + B) to G, the early one would add A,
then B, a different float32 rounding. So without torch DDP the accumulated G is set
aside while the batch runs and added back after it, G + (A + B) as in one joint
backward: the same bits, which keeps 1 rank x --update-freq k equal to k ranks
(tests/test_distributed.py).
Under torch DDP the all-reduce reads .grad inside the KL's backward, so G must be there:
((G + A) + B), equal to a few ulps.
"""

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

def detached_teacher_step(criterion) -> bool:
    """Whether a training call of ``criterion`` takes a regularised path with a detached
    teacher (its method's declaration, and the same ``is_plain`` its forward() asks; an
    armed step that never calls the early backward is an error, not a fallback)."""
    method = getattr(criterion, "method", None)
    return method is not None and method.detached_teacher and not method.is_plain()


def data_parallel_kind(model):
    """("none", None) for a bare model; ("torch" | "legacy", wrapper) for torch's
    DistributedDataParallel / fairseq's LegacyDistributedDataParallel under fairseq's
    proxies; ("other", wrapper) for any other wrapper (FSDP, SlowMo, TPU)."""
    from fairseq.distributed import DistributedTimeoutWrapper, LegacyDistributedDataParallel, ModuleProxyWrapper
    from fairseq.models import BaseFairseqModel

    m = model
    while not isinstance(m, BaseFairseqModel):
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            return "torch", m
        if isinstance(m, LegacyDistributedDataParallel):
            return "legacy", m
        if isinstance(m, (ModuleProxyWrapper, DistributedTimeoutWrapper)):
            m = m.module
            continue
        return "other", m
    return "none", None


_warned = set()


def make(enabled: bool, criterion, model, optimizer, ignore_grad: bool):
    """An :class:`EarlyCleanBackward` for this step, or None (one joint backward):
    disabled, a method whose gradients flow through every forward, or a
    data-parallel wrapper whose reduction this has not been checked against (logged once)."""
    if not (enabled and model.training and detached_teacher_step(criterion)):
        return None
    kind, wrapper = data_parallel_kind(model)
    if kind == "other":
        name = type(wrapper).__name__
        if name not in _warned:
            _warned.add(name)
            logger.warning(f"ARCH: early clean backward off under {name} (only torch DDP and legacy_ddp are "
                           "supported): one joint backward of CE + KL, the same gradients at a higher peak memory")
        return None
    return EarlyCleanBackward(optimizer, ignore_grad, kind, wrapper, model)


class EarlyCleanBackward:
    """Enter it around the criterion call; the criterion calls it once on the clean
    loss; then :meth:`backward_rest` replaces the trainer's backward."""

    def __init__(self, optimizer, ignore_grad: bool, kind: str = "none", wrapper=None, model=None):
        from fairseq.optim.amp_optimizer import AMPOptimizer

        self.optimizer = optimizer
        self.ignore_grad = ignore_grad
        self.kind, self.wrapper = kind, wrapper
        self.amp = isinstance(optimizer, AMPOptimizer)
        self.calls = 0
        self._no_sync = None
        # gradients of the update's earlier batches (--update-freq), set aside (see the
        # module's "Rounding"): not under torch DDP, whose all-reduce must see them
        self._params = list(model.parameters()) if model is not None and kind != "torch" else []
        self._set_aside = None

    def __enter__(self):
        if any(p.grad is not None for p in self._params):
            self._set_aside = [p.grad for p in self._params]
            for p in self._params:
                p.grad = None
        if self.wrapper is not None:
            # nests under the trainer's own no_sync (--update-freq): on exit the
            # wrapper's previous state comes back, whatever it was
            self._no_sync = self.wrapper.no_sync()
            self._no_sync.__enter__()
        return self

    def _add_back(self):
        """.grad = G + (this batch's gradient), in that order: AccumulateGrad's ``G += new``."""
        if self._set_aside is None:
            return
        for p, g in zip(self._params, self._set_aside):
            if g is not None and p.grad is not None:
                g.add_(p.grad)
            p.grad = g if g is not None else p.grad
        self._set_aside = None

    def _leave_no_sync(self):
        if self._no_sync is not None:
            ctx, self._no_sync = self._no_sync, None
            ctx.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb):
        self._leave_no_sync()
        if exc_type is not None or self.calls != 1:
            self._add_back()  # nothing set aside is lost on an error
        if exc_type is None and self.calls != 1:
            raise RuntimeError(
                f"arch_translation armed the early clean backward but the criterion called it {self.calls} "
                "times (expected once): detached_teacher_step() and the criterion's forward() disagree")
        return False

    def __call__(self, loss: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("the early clean backward was called twice in one train_step")
        self._backward(loss)
        self._leave_no_sync()  # the perturbed forward's backward all-reduces, once per update

    def _backward(self, loss: torch.Tensor) -> None:
        if self.ignore_grad:
            loss = loss * 0  # fairseq's dummy batch: as the trainer's `loss *= 0`
        # through the optimizer: fp16 loss scaling / AMP's grad scaler, as the trainer's
        # backward; outside autocast, as the trainer's backward
        amp_off = torch.autocast(device_type="cuda", enabled=False) if self.amp else contextlib.nullcontext()
        with amp_off, torch.autograd.profiler.record_function("backward"):
            self.optimizer.backward(loss)

    @contextlib.contextmanager
    def local(self):
        """A forward and backward whose gradient stays in this rank's ``.grad`` (inside the
        wrapper's ``no_sync``): a chunk of the regulariser but the last (``--adv-chunks``)."""
        ctx = self.wrapper.no_sync() if self.wrapper is not None else contextlib.nullcontext()
        with ctx:
            yield

    def part(self, loss: torch.Tensor) -> None:
        """Backpropagate a part of the regulariser now, inside :meth:`local` (methods/chunked.py)."""
        assert self.calls == 1, "a part of the regulariser before the early clean backward"
        self._backward(loss)

    def backward_rest(self, loss: torch.Tensor, model, sample) -> None:
        """The trainer's backward of what the criterion returned (lambda * KL's gradient).
        With the regulariser skipped (non-finite) that has no graph: the clean CE in
        .grad is the batch's whole gradient. Under torch DDP the all-reduce happens only
        in a backward through the wrapper that followed a forward outside no_sync, and
        every rank must run it: one zero-weighted forward/backward through the wrapper
        does (eval mode: no dropout RNG drawn; buffers not broadcast a second time)."""
        try:
            if loss.requires_grad:
                with torch.autograd.profiler.record_function("backward"):
                    self.optimizer.backward(loss)
                return
        finally:
            self._add_back()
        if self.kind != "torch":
            return  # bare model: nothing to reduce; legacy_ddp: the trainer all-reduces
        was_training = model.training
        self.wrapper.require_forward_param_sync = False  # --broadcast-buffers: once per update, as the others
        model.eval()
        try:
            out = model(**sample["net_input"])
        finally:
            model.train(was_training)
        with torch.autograd.profiler.record_function("backward"):
            self.optimizer.backward(out[0].float().sum() * 0.0)
