"""unwrap_model must reach the BaseFairseqModel under fairseq's wrappers, so that the
ascent forwards never go through DDP (issue 11, item 8).

fairseq wraps the model as ModuleProxyWrapper(DistributedDataParallel(model)) for both
pytorch_ddp and legacy_ddp; the proxy forwards attribute lookups to the model, so it
*looks* like an encoder-decoder. A forward through DDP is a collective when buffers are
broadcast (--broadcast-buffers) and marks parameters for the reducer: the ascent must
not run there."""

import socket

import pytest
import torch
import torch.distributed as dist
from fairseq.distributed import ModuleProxyWrapper
from fairseq.models import BaseFairseqModel
from torch.nn.parallel import DistributedDataParallel

from fairseq_arch.injection import unwrap_model

from . import utils


@pytest.fixture
def gloo_world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unwrap_reaches_the_fairseq_model_under_the_proxy(small_toy, tmp_path, gloo_world_of_one):
    task, model, crit = utils.build_for_training(small_toy, tmp_path, ["--adv-method", "smart"])
    ddp = DistributedDataParallel(model, broadcast_buffers=True)
    wrapped = ModuleProxyWrapper(ddp)
    assert hasattr(wrapped, "encoder")  # why the old "has an encoder" test stopped here
    assert unwrap_model(wrapped) is model
    assert unwrap_model(ddp) is model
    assert unwrap_model(model) is model
    assert isinstance(unwrap_model(wrapped), BaseFairseqModel)


def test_ascent_forwards_do_not_go_through_ddp(small_toy, tmp_path, gloo_world_of_one):
    """SMART with S=2: 4 forwards in all, of which exactly 2 (clean, perturbed) go
    through the DDP wrapper; the 2 ascent forwards run on the bare model."""
    task, model, crit = utils.build_for_training(small_toy, tmp_path, ["--adv-method", "smart", "--adv-steps", "2"])
    ddp = DistributedDataParallel(model, broadcast_buffers=True)
    wrapped = ModuleProxyWrapper(ddp)
    calls = {"ddp": 0, "model": 0}
    ddp.register_forward_pre_hook(lambda *a: calls.__setitem__("ddp", calls["ddp"] + 1))
    model.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    batch = utils.batches(task)[0]
    loss, _, log = crit(wrapped, batch)
    loss.backward()
    assert log["adv_fwd"] == 4
    assert calls == {"ddp": 2, "model": 4}
