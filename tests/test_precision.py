"""Issue 11, items 5-7: the adversarial criterion in reduced precision and with activation
checkpointing.

5. --amp: the parameters stay fp32 while the forward runs under fp16 autocast; the ascent's
   gradient w.r.t. delta went through the fp16 backward unscaled and underflowed, so delta
   stayed at its random start. The objective now gets a dynamic scale of its own in an fp16
   backward (halved and retried when the ascent overflows).
6. --bf16 / --fp16 round R3F's noise (std 1e-5) away: measured, and warned at start.
7. --checkpoint-activations: fairseq's activation checkpointing refuses torch.autograd.grad;
   the ascent methods refuse the flag at start, naming it.

The fp16 runs use CPU autocast (torch.autocast("cpu", dtype=torch.float16)), which runs the
linear layers and their backward in fp16 as CUDA autocast does under --amp.
"""

import logging

import pytest
import torch

from fairseq_arch.methods.ascent import AscentScaler
from fairseq_arch.methods.r3f import NOISE_FLOOR
from fairseq_arch.perturbation import Teacher
from fairseq_arch.injection import perturbed_embeddings, unwrap_model

from . import utils


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def _ascent(crit, model, batch, dtype):
    """(initial delta, delta after the S ascent steps, counts) of the criterion's fresh ascent with the
    model's forwards under CPU autocast to ``dtype`` (None: fp32)."""
    net_input = batch["net_input"]
    masks = {"source": net_input["src_tokens"].ne(1), "target": net_input["prev_output_tokens"].ne(1)}
    core = unwrap_model(model)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    counts = {"fwd": 0, "bwd": 0}
    with ctx:
        lprobs, target = crit.lprobs_fp32(model, model(**net_input), batch)
        init = crit.space.init(core, batch, masks, 1)
        delta = crit.fresh_perturbation(core, batch, crit.teacher(lprobs, target, batch), masks, 1, counts=counts)
    return init, delta, counts


def _moves(init, delta, ref_init, ref_delta):
    """Per side: (||delta - init|| / ||init||, cosine of the move with the fp32 run's move)."""
    out = {}
    for s in delta:
        move, ref = delta[s] - init[s], ref_delta[s] - ref_init[s]
        cos = float((move * ref).sum() / (move.norm() * ref.norm()).clamp_min(1e-30))
        out[s] = (float(move.norm() / init[s].norm()), cos)
    return out


def _scaled_divergence(monkeypatch, factor):
    real = Teacher.divergence
    monkeypatch.setattr(Teacher, "divergence", lambda *a, **k: real(*a, **k) * factor)


def test_amp_ascent_moves_delta_as_in_fp32(data_dir, tmp_path, monkeypatch):
    """The toy model's KL is large (its gradient w.r.t. delta ~2e-3 per coordinate); a
    trained model with a large vocabulary has a much smaller one (issue 11: ~1e-4 in norm
    over all B x T x C coordinates). Scaled by 1e-6 to that regime, the unscaled fp16
    backward flushed it to zero and delta did not move (old code: move/init 0.0-0.2,
    cosine with the fp32 move 0.0-0.07)."""
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "smart"], save_dir=str(tmp_path))
    model.train()
    batch = utils.batches(task)[0]
    _scaled_divergence(monkeypatch, 1e-6)
    ref_init, ref_delta, _ = _ascent(crit, model, batch, None)
    init, delta, counts = _ascent(crit, model, batch, torch.float16)
    assert all(torch.equal(init[s], ref_init[s]) for s in init)
    for side, (moved, cos) in _moves(init, delta, ref_init, ref_delta).items():
        assert moved > 0.5, f"{side}: delta moved {moved:.3f} x its initial norm under fp16 autocast"
        assert cos > 0.9, f"{side}: the fp16 ascent's move has cosine {cos:.3f} with the fp32 one"
    assert counts == {"fwd": crit.ascent.steps, "bwd": crit.ascent.steps}  # no retry was needed
    assert crit.ascent.scaler.scale_for(unwrap_model(model)) == 1.0  # outside autocast: fp32, unscaled


def test_amp_ascent_overflow_is_retried_at_a_smaller_scale(data_dir, tmp_path, monkeypatch):
    """A KL 100 times the toy model's overflows the fp16 backward at the starting scale
    2**15 (and 2**14): the ascent is run again at half the scale until it is finite, the
    reduced scale is kept for the next batches, the batch is not skipped."""
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "smart"], save_dir=str(tmp_path))
    model.train()
    batch = utils.batches(task)[0]
    _scaled_divergence(monkeypatch, 100.0)
    ref_init, ref_delta, _ = _ascent(crit, model, batch, None)
    init, delta, counts = _ascent(crit, model, batch, torch.float16)
    scaler, steps = crit.ascent.scaler, crit.ascent.steps
    scale = scaler.scale
    assert scale < scaler.init_scale, "the starting scale did not overflow: the test checks nothing"
    retries = counts["fwd"] // steps - 1
    assert counts == {"fwd": steps * (retries + 1), "bwd": steps * (retries + 1)}
    assert scale == scaler.init_scale / 2 ** retries and 1 <= retries <= scaler.max_retries
    for side, (moved, cos) in _moves(init, delta, ref_init, ref_delta).items():
        assert torch.isfinite(delta[side]).all()
        assert moved > 0.5 and cos > 0.9, (side, moved, cos)
    # the next batch starts at the reduced scale: no retry
    _, _, counts = _ascent(crit, model, batch, torch.float16)
    assert counts["fwd"] == steps and scaler.scale == scale


def test_ascent_scale_halves_on_overflow_and_grows_back():
    scaler = AscentScaler(init_scale=1024.0, max_retries=4, growth_interval=200)
    false, true = torch.tensor(False), torch.tensor(True)
    assert scaler.needs_retry(false, 1024.0) is True and scaler.scale == 512.0
    for _ in range(scaler.growth_interval - 1):
        assert scaler.needs_retry(true, 512.0) is False
    assert scaler.scale == 512.0
    assert scaler.needs_retry(true, 512.0) is False and scaler.scale == 1024.0
    with pytest.raises(FloatingPointError):  # unscaled (fp32) or scale 1: nothing left to try
        scaler.needs_retry(false, 1.0)


def test_ascent_scaler_gives_up_after_its_retries():
    """Every attempt non-finite: max_retries halvings, then FloatingPointError (the
    caller skips the batch's regulariser)."""
    scaler = AscentScaler(init_scale=2.0 ** 15, max_retries=3)
    scales = []
    with pytest.raises(FloatingPointError):
        scaler.run(_Fp16Core(), lambda scale: (scales.append(scale), torch.tensor(False)))
    assert scales == [2.0 ** 15, 2.0 ** 14, 2.0 ** 13, 2.0 ** 12]


class _Fp16Core(torch.nn.Module):
    """A model whose backward runs in fp16 (fp16 parameters): the scaler scales it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))


def test_fp16_model_ascent_is_scaled_and_not_skipped(data_dir, tmp_path):
    """--fp16 (fp16 parameters): the same scale; bf16 has fp32's range and is not scaled."""
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "smart"], save_dir=str(tmp_path))
    core, scaler = unwrap_model(model), crit.ascent.scaler
    assert scaler.scale_for(core.half()) == scaler.init_scale
    assert scaler.scale_for(core.bfloat16()) == 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scaler.scale_for(core.float()) == 1.0
    with torch.autocast("cpu", dtype=torch.float16):
        assert scaler.scale_for(core) == scaler.init_scale


# -- 6. bf16 / fp16 and R3F's noise ------------------------------------------------------------


WIDE = ["--encoder-embed-dim", "512", "--decoder-embed-dim", "512",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64"]


def _surviving_noise(model, batch, std, dtype):
    """(fraction of the layer-0 input's coordinates that the noise changes, cosine of the
    change with the noise x embed_scale), with the model in ``dtype``."""
    core = unwrap_model(model).to(dtype)
    src, prev = batch["net_input"]["src_tokens"], batch["net_input"]["prev_output_tokens"]
    mask = src.ne(1)
    noise = torch.randn(*src.shape, 512, generator=torch.Generator().manual_seed(0)) * std * mask[..., None]
    with torch.no_grad():
        clean, _ = core.encoder.forward_embedding(src)
        with perturbed_embeddings(core, src, prev, noise, None):
            noisy, _ = core.encoder.forward_embedding(src)
    got = (noisy.float() - clean.float())[mask]
    want = noise[mask] * core.encoder.embed_scale
    core.float()
    return float((got != 0).float().mean()), float((got * want).sum() / (got.norm() * want.norm()).clamp_min(1e-30))


def test_bf16_rounds_r3f_noise_away_and_the_floor_keeps_it(data_dir, tmp_path):
    """The measurement behind the warning (C = 512, fairseq's embedding init): R3F's std
    1e-5 barely survives bf16 (a few % of coordinates change, in no relation to the noise);
    at the suggested floor finfo.eps / 8 it does."""
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "r3f", *WIDE], save_dir=str(tmp_path))
    model.eval()
    batch = utils.batches(task)[0]
    changed, cos = _surviving_noise(model, batch, 1e-5, torch.float32)
    assert changed > 0.999 and cos > 0.9999
    changed, cos = _surviving_noise(model, batch, 1e-5, torch.bfloat16)
    assert changed < 0.05 and cos < 0.3, (changed, cos)
    for flag, dtype in (("--bf16", torch.bfloat16), ("--fp16", torch.float16)):
        changed, cos = _surviving_noise(model, batch, NOISE_FLOOR[flag], dtype)
        assert changed > 0.8 and cos > 0.97, (flag, changed, cos)


@pytest.mark.parametrize("flags,warns", [
    (["--bf16"], True),
    (["--fp16"], True),
    (["--bf16", "--adv-init-scale", "1e-3"], False),
    (["--fp16", "--adv-init-scale", "2e-4"], False),
    ([], False),
])
def test_r3f_noise_below_the_precision_warns_at_start(data_dir, tmp_path, caplog, monkeypatch, flags, warns):
    if "--bf16" in flags:  # as on a TPU host with torch_xla, the one place fairseq 0.12 runs --bf16
        from fairseq_arch.criterions import adversarial_label_smoothed_cross_entropy as crit

        monkeypatch.setattr(crit, "refuse_bf16_without_xla", lambda cfg: None)
    with caplog.at_level(logging.WARNING, logger="fairseq_arch.methods.r3f"):
        utils.build_components(data_dir, ["--adv-method", "r3f", *flags], save_dir=str(tmp_path))
    msgs = [r.getMessage() for r in caplog.records if "rounded away" in r.getMessage()]
    assert bool(msgs) is warns, msgs
    if warns:
        assert "--adv-init-scale" in msgs[0] and flags[0] in msgs[0]


def test_bf16_without_torch_xla_is_refused_at_start_naming_what_works(data_dir, tmp_path):
    """fairseq 0.12's --bf16 sets --tpu; without torch_xla its Trainer died with "'NoneType'
    object has no attribute 'xla_device'" before the first batch (CPU and CUDA alike)."""
    from fairseq_arch.validation import bf16_problem

    with pytest.raises(ValueError, match=r"--bf16: .*use --amp .* or --fp16"):
        utils.build_components(data_dir, ["--adv-method", "arch", "--bf16"], save_dir=str(tmp_path))
    assert bf16_problem(True, True, has_xla=True) is None  # a TPU host runs it
    assert bf16_problem(False, False, has_xla=False) is None


# -- 7. --checkpoint-activations --------------------------------------------------------------


@pytest.mark.parametrize("method", ["smart", "freelb", "arch"])
def test_checkpoint_activations_is_refused_at_start_naming_the_flag(data_dir, tmp_path, method):
    """It used to crash in the first batch: "Checkpointing is not compatible with .grad()"."""
    with pytest.raises(ValueError, match="--checkpoint-activations"):
        utils.build_components(data_dir, ["--adv-method", method, "--checkpoint-activations"], save_dir=str(tmp_path))


def test_checkpoint_activations_without_ascent_still_trains(data_dir, tmp_path):
    _, task, model, crit = utils.build_components(
        data_dir, ["--adv-method", "r3f", "--checkpoint-activations"], save_dir=str(tmp_path))
    model.train()
    loss, _, log = crit(model, utils.batches(task)[0])
    loss.backward()
    assert torch.isfinite(loss) and log["adv_skipped"] == 0


def test_checkpoint_activations_with_another_task_fails_at_the_first_ascent(data_dir, tmp_path):
    """--task translation has no build_model of ours: the criterion checks the model itself."""
    _, task, model, crit = utils.build_components(
        data_dir, ["--task", "translation", "--adv-method", "smart", "--checkpoint-activations"],
        save_dir=str(tmp_path))
    model.train()
    with pytest.raises(ValueError, match="--checkpoint-activations"):
        crit(model, utils.batches(task)[0])


def test_checkpoint_activations_refused_through_fairseq_train(data_dir, tmp_path):
    """The command line: fairseq-train stops before training, naming the flag."""
    res = utils.run([
        "fairseq-train", data_dir, "--save-dir", str(tmp_path), "--cpu", "--max-epoch", "1", "--max-tokens", "1000",
        "--optimizer", "adam", "--lr", "1e-3", "--num-workers", "0", *utils.ARCH_TASK, *utils.TINY_MODEL,
        "--adv-method", "smart", "--checkpoint-activations"], capture_output=True, timeout=300)
    err = res.stderr.decode()
    assert res.returncode != 0 and "--checkpoint-activations" in err, err[-2000:]
    assert "Checkpointing is not compatible" not in err
