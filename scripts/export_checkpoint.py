#!/usr/bin/env python3
"""Export a fairseq-arch checkpoint for plain fairseq (no ``--user-dir``).

ARCH is a training-time regulariser: the trained model is a stock fairseq
transformer. A fairseq-arch checkpoint still names the plugin's task
(``arch_translation``) and criterion (``adversarial_label_smoothed_cross_entropy``)
in its config, and plain fairseq refuses a task or criterion it does not know.
This script writes a copy that plain fairseq 0.12 loads in ``fairseq-generate``,
``fairseq-interactive`` and ``TransformerModel.from_pretrained`` without the
plugin installed or imported:

- ``cfg.task`` becomes the stock ``translation`` task and ``cfg.criterion`` the stock
  ``label_smoothed_cross_entropy`` criterion, keeping every field their stock
  dataclasses know (``label_smoothing``, ``report_accuracy``, data settings ...)
  and dropping the others (``arch_*``, ``adv_*`` and the plugin's interpolated
  ``save_dir``/``seed`` copies); ``common.user_dir`` is cleared;
- ``cfg.model`` (fairseq keeps the whole training ``argparse.Namespace`` there for
  legacy architectures such as ``transformer``) becomes a plain dict with the same
  renames and drops;
- the ARCH task state (``task_state["arch_cache"]``: the cache's directory, epoch
  and mode; the cache rows themselves live on disk in ``<save-dir>/arch_cache``
  and are not part of the checkpoint) is removed, the optimizer history names the
  stock criterion class, and the optimizer state (``last_optimizer_state``, about
  twice the model's size with Adam) is dropped unless ``--keep-optimizer`` (with
  it, plain ``fairseq-train --task translation --criterion label_smoothed_cross_entropy
  --restore-file OUT`` resumes with the optimizer state). Model weights, the
  training-iterator position and the meters are kept.

torch >= 2.6 (``torch.load`` defaults to ``weights_only=True``): plain fairseq 0.12
calls ``torch.load(f, map_location=...)`` and so cannot load its own ordinary
checkpoints there (the config holds an ``argparse.Namespace``: "Weights only load
failed"). The export holds only tensors, dicts, lists, tuples and primitives (the
config as a plain dict, which ``load_checkpoint_to_cpu`` turns back into an
OmegaConf config itself), so it loads under ``weights_only=True``: **a plain-fairseq
user needs nothing extra on any torch version**, no environment variable, no
patch. The script checks this on the written file and says so in its summary
line. (For the *original* checkpoints, without the plugin imported, the
documented torch switch ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` also works:
checked with torch 2.13. Load only files you trust with it: they are pickles.)

    python scripts/export_checkpoint.py checkpoints/checkpoint_best.pt export/model.pt
    fairseq-generate data-bin --path export/model.pt --beam 5   # no --user-dir
"""

import argparse
import dataclasses
import os
import sys
import tempfile

import torch

PLUGIN_TASKS = {"arch_translation"}
PLUGIN_CRITERIA = {"adversarial_label_smoothed_cross_entropy"}
PLUGIN_TASK_STATE = ("arch_cache",)  # what ArchTranslationTask.state_dict() adds
STOCK_TASK = "translation"
STOCK_CRITERION = "label_smoothed_cross_entropy"
STOCK_CRITERION_CLASS = "LabelSmoothedCrossEntropyCriterion"


class ExportError(Exception):
    """A checkpoint this script refuses, with the reason."""


def _stock_fields():
    # plain fairseq only: the export must not depend on anything of the plugin
    from fairseq.criterions.label_smoothed_cross_entropy import (
        LabelSmoothedCrossEntropyCriterionConfig,
    )
    from fairseq.tasks.translation import TranslationConfig

    def names(dc):
        return {f.name for f in dataclasses.fields(dc)} | {"_name"}

    return names(TranslationConfig), names(LabelSmoothedCrossEntropyCriterionConfig)


def _plain(obj):
    """obj with every argparse.Namespace turned into a dict (weights_only-loadable)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def export_state(state: dict, keep_optimizer: bool = False):
    """Return (exported state, list of what was changed); raises ExportError."""
    cfg = state.get("cfg")
    if not isinstance(cfg, dict) or "task" not in cfg or "criterion" not in cfg:
        raise ExportError("it has no fairseq >= 0.10 config (state['cfg'] with task and criterion)")
    task_name = (cfg.get("task") or {}).get("_name")
    crit_name = (cfg.get("criterion") or {}).get("_name")
    if task_name not in PLUGIN_TASKS and crit_name not in PLUGIN_CRITERIA:
        raise ExportError(
            f"it names task {task_name!r} and criterion {crit_name!r}, not the plugin's "
            f"{sorted(PLUGIN_TASKS)[0]!r} / {sorted(PLUGIN_CRITERIA)[0]!r}"
        )
    task_fields, crit_fields = _stock_fields()
    cfg = _plain(cfg)
    notes = []

    dropped = set()
    for section, stock_name, known in (("task", STOCK_TASK, task_fields), ("criterion", STOCK_CRITERION, crit_fields)):
        sub = cfg[section]
        gone = sorted(k for k in sub if k not in known)
        for k in gone:
            del sub[k]
        dropped.update(gone)
        sub["_name"] = stock_name
        notes.append(f"{section} {stock_name} (-{len(gone)} fields)")
    if (cfg.get("common") or {}).get("user_dir"):
        cfg["common"]["user_dir"] = None

    model = cfg.get("model")
    if isinstance(model, dict) and ("task" in model or "criterion" in model):
        # the legacy training Namespace: drop the plugin-only names, except those
        # that are also genuine settings of another section (seed, save_dir)
        elsewhere = set()
        for section, sub in cfg.items():
            if section not in ("model", "task", "criterion") and isinstance(sub, dict):
                elsewhere.update(sub)
        for k in dropped - elsewhere:
            model.pop(k, None)
        model["task"] = STOCK_TASK
        model["criterion"] = STOCK_CRITERION
        if model.get("user_dir"):
            model["user_dir"] = None

    out = {k: v for k, v in state.items() if k not in ("cfg", "task_state", "last_optimizer_state")}
    out["cfg"] = cfg
    out["args"] = None if state.get("args") is None else _plain(state["args"])
    task_state = dict(state.get("task_state") or {})
    removed = [k for k in PLUGIN_TASK_STATE if task_state.pop(k, None) is not None]
    out["task_state"] = task_state
    if removed:
        notes.append("task_state " + "+".join(removed) + " dropped")
    # the stock criterion has no parameters; a restore with plain fairseq checks the
    # criterion class name recorded next to the optimizer state
    out["criterion"] = {}
    out["optimizer_history"] = [
        dict(h, criterion_name=STOCK_CRITERION_CLASS) for h in state.get("optimizer_history") or []
    ]
    if keep_optimizer and state.get("last_optimizer_state") is not None:
        out["last_optimizer_state"] = state["last_optimizer_state"]
        notes.append("optimizer state kept")
    elif state.get("last_optimizer_state") is not None:
        notes.append("optimizer state dropped")
    return out, notes


def loads_weights_only(path: str) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:  # noqa: BLE001 - any refusal means "needs weights_only=False"
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The export loads in plain fairseq 0.12 (no --user-dir); see the module docstring.",
    )
    ap.add_argument("input", metavar="IN", help="fairseq-arch checkpoint (e.g. checkpoints/checkpoint_best.pt)")
    ap.add_argument("output", metavar="OUT", help="where to write the plain-fairseq checkpoint")
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    ap.add_argument("--keep-optimizer", action="store_true",
                    help="keep last_optimizer_state (to continue training with plain fairseq); "
                         "dropped by default, it is about twice the model's size with Adam")
    a = ap.parse_args(argv)

    if not os.path.isfile(a.input):
        ap.exit(2, f"export_checkpoint: error: IN {a.input} does not exist or is not a file\n")
    if os.path.exists(a.output) and not a.force:
        ap.exit(2, f"export_checkpoint: error: OUT {a.output} exists (use --force to overwrite)\n")
    try:
        # the input is a training checkpoint with pickled objects: weights_only=False
        # (trusted input, as for fairseq itself)
        state = torch.load(a.input, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        ap.exit(2, f"export_checkpoint: error: cannot read {a.input} as a torch checkpoint: {e}\n")
    if not isinstance(state, dict):
        ap.exit(2, f"export_checkpoint: error: {a.input} is not a fairseq-arch checkpoint: not a dict\n")
    try:
        out, notes = export_state(state, keep_optimizer=a.keep_optimizer)
    except ExportError as e:
        ap.exit(2, f"export_checkpoint: error: {a.input} is not a fairseq-arch checkpoint: {e}\n")

    out_dir = os.path.dirname(os.path.abspath(a.output))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".pt", dir=out_dir)
    os.close(fd)
    try:
        torch.save(out, tmp)
        os.replace(tmp, a.output)  # atomic: OUT is never half-written
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    safe = loads_weights_only(a.output)
    print(
        f"export_checkpoint: wrote {a.output} ({os.path.getsize(a.output) / 2**20:.1f} MiB): "
        + ", ".join(notes)
        + ("; loads with torch.load(weights_only=True), no --user-dir needed" if safe else
           "; WARNING: needs torch.load(weights_only=False), i.e. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 on torch>=2.6")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
