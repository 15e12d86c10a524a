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
