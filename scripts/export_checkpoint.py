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

Folder export (``--folder``, or OUT an existing directory or ending with ``/``): what
``TransformerModel.from_pretrained(OUT)`` loads by itself, as fairseq's released models:

- ``model.pt``: the checkpoint above, whose config also names the subword model
  (``cfg.bpe``) and, for a recipe data dir (``manifest.json``: Moses-tokenised text), the
  Moses tokenizer (``cfg.tokenizer``), so that ``translate()`` takes and returns plain text;
- ``dict.SRC.txt``, ``dict.TGT.txt``: the dictionaries, from ``--data DIR`` (default: the
  data dir the checkpoint was trained on, ``cfg.task.data``; a recipe data dir's ``bin/``
  is looked into);
- ``sentencepiece.bpe.model`` (a sentencepiece model: ``--sentencepiece-model FILE``, or
  ``spm.model`` found in DIR or its parent, where scripts/prepare-*.sh write it) or
  ``bpecodes`` (subword-nmt codes: ``--bpe-codes FILE``, or ``code``/``codes``/``bpecodes``
  found there), the names ``from_pretrained`` picks up itself;
- ``README.md``: how to load it.

    python scripts/export_checkpoint.py checkpoints/checkpoint_best.pt export/ --data data/iwslt14
    python -c "from fairseq.models.transformer import TransformerModel as T; \\
        print(T.from_pretrained('export').translate('hallo welt .'))"
"""

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np
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
    """obj with every argparse.Namespace turned into a dict, numpy arrays into tensors and numpy scalars
    into Python numbers (weights_only-loadable: fairseq's --eval-bleu meters keep numpy arrays in
    extra_state["metrics"])."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
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

    out = {k: v if k == "model" else _plain(v) for k, v in state.items()
           if k not in ("cfg", "task_state", "last_optimizer_state")}
    out["cfg"] = cfg
    out["args"] = None if state.get("args") is None else _plain(state["args"])
    task_state = dict(state.get("task_state") or {})
    removed = [k for k in PLUGIN_TASK_STATE if task_state.pop(k, None) is not None]
    out["task_state"] = _plain(task_state)
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


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# folder export: model.pt + dictionaries + subword model, what from_pretrained(OUT) loads

MODEL_FILE = "model.pt"
SPM_FILE = "sentencepiece.bpe.model"  # the names fairseq's hub_utils.from_pretrained looks for
CODES_FILE = "bpecodes"
SPM_NAMES = ("spm.model", "sentencepiece.bpe.model", "sentencepiece.model")  # prepare.py writes spm.model
CODES_NAMES = ("code", "codes", "bpecodes", "bpe.codes")  # fairseq's prepare-iwslt14.sh writes code


def folder_mode(a) -> bool:
    """Folder export when asked (--folder), or OUT is a directory or ends with a separator."""
    return a.folder or os.path.isdir(a.output) or a.output.endswith((os.sep, "/"))


def dict_dir(data: str, langs):
    """The directory of dict.SRC.txt / dict.TGT.txt: DATA itself or a recipe data dir's DATA/bin."""
    for d in (data, os.path.join(data, "bin")):
        if all(os.path.isfile(os.path.join(d, f"dict.{l}.txt")) for l in langs):
            return d
    return None


def find_one(dirs, names):
    """The first existing file DIR/NAME (dirs in order, then names), or None."""
    for d in dirs:
        for n in names:
            if os.path.isfile(os.path.join(d, n)):
                return os.path.join(d, n)
    return None


def language_pair(cfg: dict, data: str):
    """(src, tgt) from the checkpoint's task config, else from DATA's two dict.*.txt files."""
    task = cfg.get("task") or {}
    if task.get("source_lang") and task.get("target_lang"):
        return task["source_lang"], task["target_lang"]
    langs = sorted({os.path.basename(p)[5:-4] for d in (data, os.path.join(data, "bin"))
                    for p in glob.glob(os.path.join(d, "dict.*.txt"))})
    if len(langs) != 2:
        raise ExportError(f"the checkpoint names no source/target language and {data} does not hold exactly two "
                          f"dict.LANG.txt files (found {langs or 'none'}): pass --data with the data dir the "
                          "model was trained on")
    return langs[0], langs[1]


def folder_sources(a, cfg: dict):
    """What goes into the folder: {"langs", "dicts", "spm" | "codes", "manifest"}; raises ExportError
    naming the flag to pass when something is missing."""
    data = a.data or ((cfg.get("task") or {}).get("data") or "").split(os.pathsep)[0]
    if not data:
        raise ExportError("the checkpoint records no data dir (cfg.task.data): pass --data DIR")
    if not os.path.isdir(data):
        origin = "--data" if a.data else "the checkpoint's cfg.task.data"
        raise ExportError(f"data dir {data} ({origin}) is not a "
                          "directory: pass --data with the fairseq-preprocess output (or recipe data dir) the model "
                          "was trained on")
    langs = language_pair(cfg, data)
    ddir = dict_dir(data, langs)
    if ddir is None:
        raise ExportError(f"no dict.{langs[0]}.txt and dict.{langs[1]}.txt in {data} or {data}/bin: pass --data with "
                          "the data dir the model was trained on")
    near = [ddir, os.path.dirname(os.path.abspath(ddir))]
    spm = a.sentencepiece_model or (None if a.bpe_codes else find_one(near, SPM_NAMES))
    codes = a.bpe_codes or (None if a.sentencepiece_model else find_one(near, CODES_NAMES))
    if spm and codes and not (a.sentencepiece_model or a.bpe_codes):
        raise ExportError(f"both a sentencepiece model ({spm}) and BPE codes ({codes}) lie next to the data: choose "
                          "one with --sentencepiece-model FILE or --bpe-codes FILE")
    for flag, path in (("--sentencepiece-model", a.sentencepiece_model), ("--bpe-codes", a.bpe_codes)):
        if path and not os.path.isfile(path):
            raise ExportError(f"{flag} {path}: no such file")
    manifest = find_one(near[1:] + near[:1], ("manifest.json",))
    return {"langs": langs, "dicts": [os.path.join(ddir, f"dict.{l}.txt") for l in langs], "spm": spm,
            "codes": codes, "manifest": json.load(open(manifest)) if manifest else None}


def add_text_pipeline(out: dict, src: dict):
    """Name the language pair, the subword model and, for a recipe data dir, the Moses tokenizer in the
    export's config, so that from_pretrained(folder).translate() takes plain text. Returns notes on what
    the input needs."""
    cfg, notes = out["cfg"], []
    # fairseq infers a missing pair from the data files (train.SRC-TGT.*), which the folder does not hold
    for section in ("task", "model"):
        sub = cfg.get(section)
        if isinstance(sub, dict) and ("source_lang" in sub or section == "task"):
            sub["source_lang"], sub["target_lang"] = src["langs"]
    if src["spm"]:
        cfg["bpe"] = {"_name": "sentencepiece", "sentencepiece_model": SPM_FILE}
    elif src["codes"]:
        cfg["bpe"] = {"_name": "subword_nmt", "bpe_codes": CODES_FILE, "bpe_separator": "@@"}
        notes.append("subword-nmt codes: loading needs `pip install subword-nmt`")
    else:
        notes.append("no sentencepiece model or BPE codes found (--sentencepiece-model / --bpe-codes): "
                     "translate() takes text in the dictionary's units")
    m = src["manifest"]
    if m is not None:  # scripts/prepare-*.sh: Moses-tokenised text (tokenizer.perl's defaults, -a for wmt14)
        s, t = src["langs"]
        cfg["tokenizer"] = {"_name": "moses", "source_lang": s, "target_lang": t,
                            "moses_no_dash_splits": m.get("style") != "wmt14", "moses_no_escape": False}
        notes.append("translate() takes untokenised text: model.pt names the Moses tokenizer the data was "
                     "prepared with")
        if m.get("lowercase"):
            notes.append("trained on lowercased text: lowercase the input")
    return notes


def copy_file(src: str, dst: str):
    """Copy atomically (a temporary file renamed), mode 0666 less the umask."""
    fd, tmp = tempfile.mkstemp(prefix=".export-", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def usage_lines(folder: str, src: dict):
    """Python lines that load the folder and translate with it."""
    s, t = src["langs"]
    return [
        "from fairseq.models.transformer import TransformerModel",
        f"m = TransformerModel.from_pretrained({folder!r})  # model.pt, dict.{s}.txt, dict.{t}.txt"
        + (f", {SPM_FILE}" if src["spm"] else f", {CODES_FILE}" if src["codes"] else ""),
        "print(m.translate('...', beam=5))  # no --user-dir, no fairseq_arch",
    ]


def write_readme(folder: str, src: dict, notes, input_name: str):
    """FOLDER/README.md: what the folder is and how to load it (Python and command line)."""
    s, t = src["langs"]
    body = "\n".join([
        f"# {s}-{t} translation model (fairseq transformer)", "",
        f"Exported by fairseq-arch's scripts/export_checkpoint.py from `{input_name}`: a stock fairseq 0.12",
        "checkpoint (task `translation`); loads without the plugin and with torch.load(weights_only=True).", "",
        "```python", *usage_lines(".", src), "```", "",
        *[f"- {n}" for n in notes],
        f"- command line: `fairseq-interactive . --path model.pt -s {s} -t {t}" + (
            f" --bpe sentencepiece --sentencepiece-model {SPM_FILE}" if src["spm"] else
            f" --bpe subword_nmt --bpe-codes {CODES_FILE}" if src["codes"] else "") + (
            " --tokenizer moses" if src["manifest"] is not None else "") + "`", ""])
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(body)


def folder_targets(folder: str, src: dict):
    """{destination file: source file or None (model.pt, written from the state)}."""
    files = {os.path.join(folder, MODEL_FILE): None, os.path.join(folder, "README.md"): None}
    for lang, path in zip(src["langs"], src["dicts"]):
        files[os.path.join(folder, f"dict.{lang}.txt")] = path
    if src["spm"]:
        files[os.path.join(folder, SPM_FILE)] = src["spm"]
    elif src["codes"]:
        files[os.path.join(folder, CODES_FILE)] = src["codes"]
    return files


def save_state(out: dict, path: str):
    """torch.save atomically (OUT is never half-written), mode 0666 less the umask."""
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".pt", dir=out_dir)
    os.close(fd)
    try:
        torch.save(out, tmp)
        # mkstemp makes the file 0600: give OUT the mode any new file gets (0666 less the umask)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)  # atomic: OUT is never half-written
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def summary(path: str, notes) -> str:
    safe = loads_weights_only(path)
    return (
        f"export_checkpoint: wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB): "
        + ", ".join(notes)
        + ("; loads with torch.load(weights_only=True), no --user-dir needed" if safe else
           "; WARNING: needs torch.load(weights_only=False), i.e. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 on torch>=2.6")
    )


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The export loads in plain fairseq 0.12 (no --user-dir); see the module docstring. Folder export: "
               "OUT/model.pt, OUT/dict.SRC.txt, OUT/dict.TGT.txt, OUT/sentencepiece.bpe.model (or OUT/bpecodes) "
               "and OUT/README.md, loaded by TransformerModel.from_pretrained(OUT).",
    )
    ap.add_argument("input", metavar="IN", help="fairseq-arch checkpoint (e.g. checkpoints/checkpoint_best.pt)")
    ap.add_argument("output", metavar="OUT",
                    help="where to write the plain-fairseq checkpoint; a directory (existing, ending with '/', or "
                         "with --folder) gets the folder export for from_pretrained")
    ap.add_argument("--folder", action="store_true",
                    help="write a from_pretrained folder in OUT (created if needed): model.pt, dictionaries, "
                         "subword model, README.md")
    ap.add_argument("--data", metavar="DIR",
                    help="folder export: the data dir the model was trained on, fairseq-preprocess output or a "
                         "recipe data dir (its bin/, spm.model and manifest.json are used); default: the "
                         "checkpoint's cfg.task.data")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sentencepiece-model", metavar="FILE",
                   help="folder export: the sentencepiece model of the data (default: spm.model found in DIR or "
                        "its parent); copied as sentencepiece.bpe.model")
    g.add_argument("--bpe-codes", metavar="FILE",
                   help="folder export: subword-nmt BPE codes of the data (default: code/codes/bpecodes found in "
                        "DIR or its parent); copied as bpecodes")
    ap.add_argument("--force", action="store_true", help="overwrite OUT (folder export: the files it writes there)")
    ap.add_argument("--keep-optimizer", action="store_true",
                    help="keep last_optimizer_state (to continue training with plain fairseq); "
                         "dropped by default, it is about twice the model's size with Adam")
    a = ap.parse_args(argv)
    a.folder = folder_mode(a)
    if not a.folder:
        for flag in ("data", "sentencepiece_model", "bpe_codes"):
            if getattr(a, flag):
                ap.error(f"--{flag.replace('_', '-')} is for the folder export: add --folder (or give OUT as a "
                         "directory, e.g. export/)")
    return ap, a


def load_input(ap, path: str) -> dict:
    """The training checkpoint at PATH (a dict), or exit 2 naming the problem."""
    try:
        # the input is a training checkpoint with pickled objects: weights_only=False
        # (trusted input, as for fairseq itself)
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        ap.exit(2, f"export_checkpoint: error: cannot read {path} as a torch checkpoint: {e}\n")
    if not isinstance(state, dict):
        ap.exit(2, f"export_checkpoint: error: {path} is not a fairseq-arch checkpoint: not a dict\n")
    return state


def export_folder(ap, a, state: dict, out: dict, notes):
    """Write the from_pretrained folder a.output (refusing to overwrite without --force) and print how to load it."""
    try:
        src = folder_sources(a, _plain(state["cfg"]))
    except ExportError as e:
        ap.exit(2, f"export_checkpoint: error: folder export of {a.input}: {e}\n")
    files = folder_targets(a.output, src)
    there = [p for p in files if os.path.exists(p)]
    if there and not a.force:
        ap.exit(2, f"export_checkpoint: error: OUT {a.output} already holds {', '.join(map(os.path.basename, there))} "
                   "(use --force to overwrite)\n")
    os.makedirs(a.output, exist_ok=True)
    hints = add_text_pipeline(out, src)
    for dst, origin in files.items():
        if origin is not None:
            copy_file(origin, dst)
    write_readme(a.output, src, hints, os.path.basename(a.input))
    model = os.path.join(a.output, MODEL_FILE)
    save_state(out, model)
    print(summary(model, notes))
    names = ", ".join(sorted(map(os.path.basename, files)))
    print(f"export_checkpoint: folder {a.output}: {names}; load it with")
    print("\n".join("    " + l for l in usage_lines(a.output, src) + [f"# note: {n}" for n in hints]))


def main(argv=None):
    ap, a = parse_args(argv)
    if not os.path.isfile(a.input):
        ap.exit(2, f"export_checkpoint: error: IN {a.input} does not exist or is not a file\n")
    if not a.folder and os.path.exists(a.output) and not a.force:
        ap.exit(2, f"export_checkpoint: error: OUT {a.output} exists (use --force to overwrite)\n")
    state = load_input(ap, a.input)
    try:
        out, notes = export_state(state, keep_optimizer=a.keep_optimizer)
    except ExportError as e:
        ap.exit(2, f"export_checkpoint: error: {a.input} is not a fairseq-arch checkpoint: {e}\n")
    if a.folder:
        export_folder(ap, a, state, out, notes)
        return 0
    save_state(out, a.output)
    print(summary(a.output, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
