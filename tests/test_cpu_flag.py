"""`--cpu` on a machine that has a GPU: nothing of the plugin may go to CUDA (the suite passes
`--cpu` everywhere and must also pass on a lent GPU machine). The task, model and criterion are
built with `--cpu` as fairseq-train builds them; then CUDA is made to look present, every way
onto it raises, and ARCH runs a refresh epoch, its finalisation and a reuse epoch."""

import torch

from fairseq_arch import neighbors

from . import utils


class CudaTouched(AssertionError):
    pass


def test_cpu_flag_keeps_the_plugin_on_the_cpu_when_cuda_looks_available(small_toy, tmp_path, monkeypatch):
    utils.quiet_logs()
    _, task, model, crit = utils.build_components(
        small_toy, ["--arch-cache-fraction", "0.3", "--arch-refresh-interval", "2"], save_dir=str(tmp_path))
    batches = utils.batches(task)

    backends = []
    real_choose = neighbors.choose_backend
    monkeypatch.setattr(neighbors, "choose_backend", lambda d: backends.append(str(d)) or real_choose(d))

    def refuse(*a, **k):
        raise CudaTouched("CUDA used although --cpu was given")

    real_to = torch.Tensor.to

    def to(self, *a, **k):
        dev = k.get("device", a[0] if a else None)
        if dev is not None and "cuda" in str(dev):
            refuse()
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("current_device", "set_device", "synchronize", "empty_cache", "get_rng_state",
                 "set_rng_state", "manual_seed"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(torch.Tensor, "cuda", refuse)
    monkeypatch.setattr(torch.Tensor, "to", to)
    assert torch.cuda.is_available()  # the patch is in force

    for epoch in (1, 2, 3):  # refresh, finalise + reuse, refresh
        task.begin_epoch(epoch, model)
        model.train()
        for b in batches:
            loss, _, log = crit(model, b)
            loss.backward()
            assert log["adv_skipped"] == 0
    assert backends and set(backends) == {"cpu"}, f"neighbour search devices: {backends}"
