"""fairseq's training components built in-process from a command line, exactly as
fairseq-train builds them: for the tests, the benchmarks and notebooks."""

import os

import torch

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
# the plugin's task and criterion as a fairseq command line names them
PLUGIN_FLAGS = ["--user-dir", PLUGIN_DIR, "--task", "arch_translation",
                "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


def build_from_flags(argv, cuda: bool = False):
    """(cfg, task, model, criterion) as fairseq-train builds them from its command line
    ``argv`` (data directory first; the last of a repeated flag wins), with the training
    split loaded; the model moved to the GPU when ``cuda``."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, list(argv))
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    if cuda:
        model = model.cuda()
    return cfg, task, model, criterion


def criterion_with(cfg, task, **overrides):
    """Another adversarial criterion for ``task``: ``cfg.criterion`` (resolved) with the
    given options changed, e.g. ``criterion_with(cfg, task, adv_method="smart")``. The task
    keeps the criterion it built (its cache's sides and ball)."""
    from omegaconf import OmegaConf

    from .criterions.adversarial_label_smoothed_cross_entropy import AdversarialLabelSmoothedCrossEntropyCriterion

    options = OmegaConf.to_container(cfg.criterion, resolve=True)
    unknown = set(overrides) - set(options)
    assert not unknown, f"not options of the criterion: {sorted(unknown)}"
    options.update(overrides)
    return AdversarialLabelSmoothedCrossEntropyCriterion(OmegaConf.create(options), task)
