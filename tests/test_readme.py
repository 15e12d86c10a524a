"""The README's train, evaluate and translate commands run as written, from a directory outside
the repository, on a slice of fairseq's IWSLT'14 De-En data (BPE, separate dictionaries: what
fairseq's prepare-iwslt14.sh leaves in $TEXT).

Two edits make them fit a CPU test, and nothing else changes: `--fp16` is dropped (no GPU) and
`--max-epoch 150` becomes `--max-epoch 1`."""

import os
import re

from . import utils

MARKER = re.compile(r"<!-- README-test: (\w+) -->\n```bash\n(.*?)\n```", re.S)
CPU_EDITS = ((" --fp16", ""), ("--max-epoch 150", "--max-epoch 1"))


def readme_blocks() -> dict:
    with open(os.path.join(utils.REPO, "README.md")) as f:
        return dict(MARKER.findall(f.read()))


def _short_lines(paths, n, max_words=20):
    """The first ``n`` line numbers whose lines are short in every file of ``paths``."""
    files = [open(p).read().splitlines() for p in paths]
    keep = [i for i in range(len(files[0])) if all(len(f[i].split()) <= max_words for f in files)]
    return keep[:n]


def _text_dir(root):
    """$TEXT as prepare-iwslt14.sh leaves it: {train,valid,test}.{de,en} (BPE), code, tmp/test.en
    (the tokenised reference)."""
    data = utils.require_shared("iwslt14-deen-partial")
    os.makedirs(os.path.join(root, "tmp"))
    sources = {"train": os.path.join(data, "train_sample_bpe10k", "train"),
               "valid": os.path.join(data, "bpe10k", "valid"), "test": os.path.join(data, "bpe10k", "test")}
    sizes = {"train": 120, "valid": 8, "test": 8}
    for split, prefix in sources.items():
        paths = [f"{prefix}.{lang}" for lang in ("de", "en")]
        if split == "test":
            paths.append(os.path.join(data, "tok", "test.en"))
        rows = _short_lines(paths, sizes[split])
        for path, out in zip(paths, [f"{split}.de", f"{split}.en", "tmp/test.en"]):
            lines = open(path).read().splitlines()
            with open(os.path.join(root, out), "w") as f:
                f.writelines(lines[i] + "\n" for i in rows)
    with open(os.path.join(data, "bpe10k", "code")) as src, open(os.path.join(root, "code"), "w") as dst:
        dst.write(src.read())


def test_readme_has_the_tested_blocks():
    blocks = readme_blocks()
    assert set(blocks) == {"train", "evaluate", "translate"}, set(blocks)
    for old, _ in CPU_EDITS:
        assert old in blocks["train"]  # the edits below still apply to what the README says
    assert '"$ARCH_REPO/fairseq_arch"' in blocks["train"] and "--share-all-embeddings" not in blocks["train"]


def test_readme_train_evaluate_translate_run_as_written(tmp_path):
    blocks = readme_blocks()
    text, work = tmp_path / "text", tmp_path / "elsewhere"
    _text_dir(str(text))
    work.mkdir()
    script = blocks["train"]
    for old, new in CPU_EDITS:
        script = script.replace(old, new)
    script = "set -euo pipefail\n" + "\n".join([script, blocks["evaluate"], blocks["translate"]])
    venv_bin = os.path.dirname(utils.console("fairseq-train"))
    env = dict(os.environ, ARCH_REPO=utils.REPO, TEXT=str(text), PATH=f"{venv_bin}:{os.environ['PATH']}",
               PYTHONWARNINGS="ignore")
    res = utils.run(["bash", "-c", script], timeout=1800, cwd=str(work), env=env, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert os.path.exists(work / "checkpoints" / "arch-de-en" / "checkpoint_best.pt")
    assert os.path.exists(work / "checkpoints" / "arch-de-en" / "arch_cache" / "gen-e0001" / "source.bin")
    assert re.search(r"BLEU = [0-9.]+ .*BP = [0-9.]+ ratio = [0-9.]+", res.stdout), res.stdout[-3000:]
    assert re.search(r"^H-0\t", res.stdout, re.M), res.stdout[-3000:]
    assert not os.path.exists(os.path.join(utils.REPO, "data-bin", "iwslt14.de-en"))  # ran elsewhere


def test_readme_is_short_and_its_links_resolve():
    """The README stays a five-minute read, and every local link in it and in docs/ exists."""
    readme = os.path.join(utils.REPO, "README.md")
    assert len(open(readme).read().splitlines()) <= 260
    pages = [readme] + [os.path.join(utils.REPO, "docs", p) for p in os.listdir(os.path.join(utils.REPO, "docs"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(page).read()):
            if "://" in target:
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target))
            assert os.path.exists(path), f"{os.path.relpath(page, utils.REPO)} links to {target}, which does not exist"
