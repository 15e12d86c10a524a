"""scripts/export_checkpoint.py: a fairseq-arch checkpoint exported for plain fairseq
loads without the plugin in fairseq-generate (same hypotheses as the original with
--user-dir), fairseq-interactive and TransformerModel.from_pretrained, each in a
subprocess that never imports fairseq_arch and sets no torch switch (the export
loads with torch.load(weights_only=True), so torch >= 2.6 needs nothing)."""

import os
import sys

import pytest
import torch

from . import utils

import export_checkpoint  # noqa: E402  (scripts/ is on sys.path via tests/utils)

SCRIPT = os.path.join(utils.REPO, "scripts", "export_checkpoint.py")
# what the README tells plain-fairseq users to set: nothing. Remove torch's
# weights_only overrides so that a leftover one in the caller's shell cannot help.
PLAIN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "PYTHONPATH")}
PLAIN_ENV["PYTHONWARNINGS"] = "ignore"


@pytest.fixture(scope="module")
def exported(small_toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    save = str(root / "ckpt")
    utils.train(small_toy, save, [*utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "1"])
    original = os.path.join(save, "checkpoint_last.pt")
    out = str(root / "plain" / "model.pt")
    r = utils.run([sys.executable, SCRIPT, original, out], timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("export_checkpoint: wrote ") and "weights_only=True" in r.stdout, r.stdout
    return {"data": small_toy, "raw": os.path.join(os.path.dirname(small_toy), "raw"),
            "original": original, "out": out, "cwd": str(root)}


def _plain(cmd, ex, **kw):
    """A subprocess without the plugin: no --user-dir, not run from the repository."""
    r = utils.run(cmd, timeout=300, capture_output=True, text=True, env=PLAIN_ENV, cwd=ex["cwd"], **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    return r.stdout


def _hyps(stdout):
    lines = sorted(l for l in stdout.splitlines() if l.startswith("H-"))
    assert lines, stdout[-2000:]
    return lines


def test_exported_config_and_state(exported):
    state = torch.load(exported["out"], map_location="cpu", weights_only=True)  # torch >= 2.6's default
    cfg = state["cfg"]
    assert cfg["task"]["_name"] == "translation"
    assert cfg["criterion"]["_name"] == "label_smoothed_cross_entropy"
    assert cfg["criterion"]["label_smoothing"] == 0.1
    assert cfg["common"]["user_dir"] is None
    for section in ("task", "criterion", "model"):
        assert not [k for k in cfg[section] if k.startswith(("arch_", "adv_"))], section
    assert cfg["model"]["task"] == "translation" and cfg["model"]["criterion"] == "label_smoothed_cross_entropy"
    assert "arch_cache" not in state["task_state"]
    assert "last_optimizer_state" not in state
    assert {h["criterion_name"] for h in state["optimizer_history"]} == {"LabelSmoothedCrossEntropyCriterion"}
    original = torch.load(exported["original"], map_location="cpu", weights_only=False)
    assert "arch_cache" in original["task_state"]  # the test would not test anything otherwise
    assert original["model"].keys() == state["model"].keys()
    assert all(torch.equal(original["model"][k], state["model"][k]) for k in original["model"])


def test_generate_without_plugin_matches_original(exported):
    gen = ["fairseq-generate", exported["data"], "--cpu", "--beam", "2", "--batch-size", "32"]
    plain = _plain([*gen, "--path", exported["out"]], exported)
    r = utils.run([*gen, "--path", exported["original"], "--user-dir", utils.USER_DIR],
                  timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _hyps(plain) == _hyps(r.stdout)


def test_interactive_without_plugin(exported):
    with open(os.path.join(exported["raw"], "test.src")) as f:
        line = f.readline()
    out = _plain(["fairseq-interactive", exported["data"], "--path", exported["out"], "--cpu", "--beam", "2",
                  "-s", "src", "-t", "tgt"], exported, input=line)
    assert [l for l in out.splitlines() if l.startswith("S-0\t")] == ["S-0\t" + line.strip()]
    assert len(_hyps(out)) == 1


def test_from_pretrained_without_plugin(exported):
    with open(os.path.join(exported["raw"], "test.src")) as f:
        line = f.readline().strip()
    code = (
        "import sys\n"
        "from fairseq.models.transformer import TransformerModel\n"
        "m = TransformerModel.from_pretrained(sys.argv[1], checkpoint_file=sys.argv[2],\n"
        "    data_name_or_path=sys.argv[3], source_lang='src', target_lang='tgt')\n"
        "out = m.translate(sys.argv[4], beam=2)\n"
        "assert not [k for k in sys.modules if k.startswith('fairseq_arch')], 'plugin imported'\n"
        "print('OUT\\t' + out)\n"
    )
    out = _plain([sys.executable, "-c", code, os.path.dirname(exported["out"]), os.path.basename(exported["out"]),
                  exported["data"], line], exported)
    assert any(l.startswith("OUT\t") and l[4:].strip() for l in out.splitlines()), out


def test_errors(exported, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            export_checkpoint.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err

    fails([str(tmp_path / "missing.pt"), str(tmp_path / "o.pt")], "does not exist")
    fails([exported["original"], exported["out"]], "exists (use --force")
    fails([exported["out"], str(tmp_path / "o.pt")], "is not a fairseq-arch checkpoint")
    junk = tmp_path / "junk.pt"
    torch.save({"model": {}}, str(junk))
    fails([str(junk), str(tmp_path / "o.pt")], "is not a fairseq-arch checkpoint")
    assert not os.path.exists(tmp_path / "o.pt")
    # --force overwrites; --keep-optimizer keeps the (weights_only-loadable) optimizer state
    forced = str(tmp_path / "forced.pt")
    open(forced, "w").close()
    assert export_checkpoint.main([exported["original"], forced, "--force", "--keep-optimizer"]) == 0
    assert "optimizer state kept" in capsys.readouterr().out
    assert "last_optimizer_state" in torch.load(forced, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# folder export: model.pt + dictionaries (+ subword model) that from_pretrained(folder) loads

# a subprocess that never imports fairseq_arch: from_pretrained(FOLDER, **KWARGS) translates LINE
FROM_PRETRAINED = (
    "import json, sys\n"
    "from fairseq.models.transformer import TransformerModel\n"
    "m = TransformerModel.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))\n"
    "out = m.translate(sys.argv[3], beam=2)\n"
    "assert 'fairseq_arch' not in sys.modules, 'plugin imported'\n"
    "assert not [k for k in sys.modules if k.startswith('fairseq_arch')], 'plugin imported'\n"
    "print('OUT\\t' + out)\n"
)


def _translate(folder, line, ex, **kwargs):
    import json

    out = _plain([sys.executable, "-c", FROM_PRETRAINED, folder, json.dumps(kwargs), line], ex)
    got = [l[4:] for l in out.splitlines() if l.startswith("OUT\t")]
    assert got and got[0].strip(), out
    return got[0]


def _export_folder(original, folder, *flags):
    r = utils.run([sys.executable, SCRIPT, original, folder, *flags], timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export_checkpoint: folder " in r.stdout and "from_pretrained(" in r.stdout, r.stdout
    return r.stdout


@pytest.fixture(scope="module")
def spm_toy(small_toy, tmp_path_factory):
    """The toy corpus as scripts/prepare-*.sh lays a data dir out: DATA/spm.model (joint
    sentencepiece), DATA/bin (fairseq-preprocess of the pieces); a tiny model trained 1 epoch on it."""
    import sentencepiece as spm

    raw = os.path.join(os.path.dirname(small_toy), "raw")
    data = tmp_path_factory.mktemp("spm_data")
    joint = str(data / "joint.txt")
    with open(joint, "w") as out:
        for l in ("src", "tgt"):
            out.write(open(os.path.join(raw, f"train.{l}")).read())
    spm.SentencePieceTrainer.train(input=joint, model_prefix=str(data / "spm"), vocab_size=100, model_type="unigram",
                                   bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(data / "spm.model"))
    pieces = data / "pieces"
    pieces.mkdir()
    for split in ("train", "valid", "test"):
        for l in ("src", "tgt"):
            lines = open(os.path.join(raw, f"{split}.{l}")).read().splitlines()
            (pieces / f"{split}.{l}").write_text("".join(" ".join(sp.encode(x, out_type=str)) + "\n" for x in lines))
    utils.preprocess(str(pieces), str(data / "bin"))
    save = str(data / "ckpt")
    utils.train(str(data / "bin"), save, [*utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "1"])
    return {"data": str(data), "raw": raw, "original": os.path.join(save, "checkpoint_last.pt"),
            "cwd": str(tmp_path_factory.mktemp("spm_cwd"))}


def _first_test_line(raw):
    with open(os.path.join(raw, "test.src")) as f:
        return f.readline().strip()


def test_folder_export_with_sentencepiece_loads_with_from_pretrained(spm_toy, tmp_path):
    folder = str(tmp_path / "export")
    # the data dir comes from the checkpoint (cfg.task.data = DATA/bin); spm.model is found in DATA
    stdout = _export_folder(spm_toy["original"], folder, "--folder")
    assert sorted(os.listdir(folder)) == ["README.md", "dict.src.txt", "dict.tgt.txt", "model.pt",
                                          "sentencepiece.bpe.model"]
    assert open(os.path.join(folder, "dict.src.txt")).read() == open(os.path.join(spm_toy["data"], "bin",
                                                                                 "dict.src.txt")).read()
    state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    assert state["cfg"]["task"]["_name"] == "translation" and state["cfg"]["bpe"]["_name"] == "sentencepiece"
    assert "weights_only=True" in stdout and "TransformerModel.from_pretrained(" in open(
        os.path.join(folder, "README.md")).read()
    line = _first_test_line(spm_toy["raw"])  # plain text: the sentencepiece model splits it
    spm_model = os.path.join(folder, "sentencepiece.bpe.model")
    explicit = _translate(folder, line, spm_toy, checkpoint_file="model.pt", data_name_or_path=".",
                          bpe="sentencepiece", sentencepiece_model=spm_model)
    assert "▁" not in explicit  # pieces decoded back to text
    assert _translate(folder, line, spm_toy) == explicit  # the folder alone: bpe named in model.pt's config


def test_folder_export_without_subword_model(exported, tmp_path):
    """The toy corpus has no sentencepiece model or BPE codes: model.pt + dictionaries, input in words."""
    folder = str(tmp_path / "toy") + os.sep  # a trailing separator asks for a folder, as an existing dir does
    stdout = _export_folder(exported["original"], folder, "--data", exported["data"])
    assert sorted(os.listdir(folder)) == ["README.md", "dict.src.txt", "dict.tgt.txt", "model.pt"]
    assert "no sentencepiece model or BPE codes found" in stdout
    state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
    assert state["cfg"].get("bpe") is None and state["cfg"].get("tokenizer") is None
    out = _translate(folder, _first_test_line(exported["raw"]), exported, checkpoint_file="model.pt",
                     data_name_or_path=".")
    assert out.split()


def test_folder_export_errors(exported, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            export_checkpoint.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err

    original = exported["original"]
    fails([original, str(tmp_path / "o.pt"), "--data", exported["data"]],
          "--data is for the folder export: add --folder")
    fails([original, str(tmp_path / "f"), "--folder", "--data", str(tmp_path / "nowhere")],
          "(--data) is not a directory")
    fails([original, str(tmp_path / "f"), "--folder", "--data", str(tmp_path)], "pass --data with the data dir")
    fails([original, str(tmp_path / "f"), "--folder", "--sentencepiece-model", str(tmp_path / "none.model")],
          "--sentencepiece-model")
    assert not os.path.exists(tmp_path / "f" / "model.pt")
    # an existing directory is a folder export; the files it would overwrite need --force
    d = tmp_path / "existing"
    d.mkdir()
    (d / "model.pt").write_bytes(b"")
    fails([original, str(d)], "already holds model.pt (use --force")
    assert export_checkpoint.main([original, str(d), "--force"]) == 0
    assert "dict.src.txt" in os.listdir(d) and os.path.getsize(d / "model.pt") > 0


def test_numpy_values_become_weights_only_loadable(tmp_path):
    """fairseq's --eval-bleu meters keep numpy arrays (and scores may be numpy scalars) in extra_state:
    the export turns them into tensors and Python numbers, which torch.load(weights_only=True) accepts."""
    import numpy as np

    extra = {"metrics": {"valid": [[0, "_bleu_counts_0", 3, {"val": np.array([170, 162]), "sum": np.array([1, 2])}]]},
             "best": np.float64(12.5)}
    plain = export_checkpoint._plain(extra)
    path = str(tmp_path / "x.pt")
    torch.save(plain, path)
    back = torch.load(path, map_location="cpu", weights_only=True)
    assert back["best"] == 12.5 and isinstance(back["best"], float)
    assert back["metrics"]["valid"][0][3]["val"].tolist() == [170, 162]
