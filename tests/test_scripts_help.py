"""Every entry script answers -h/--help with its usage and exit status 0, and does nothing else
(install.sh installs nothing, demo.sh makes no workdir)."""

import glob
import os
import sys

import pytest

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", ARCH_SKIP_INSTALL="1")
SHELL = sorted(p for p in glob.glob(os.path.join(utils.REPO, "scripts", "*.sh")) if not p.endswith("/env.sh"))
PYTHON = sorted(glob.glob(os.path.join(utils.REPO, "scripts", "*.py")))


@pytest.mark.parametrize("path", SHELL + PYTHON, ids=os.path.basename)
def test_entry_script_help(path, tmp_path):
    cmd = ["bash", path, "--help"] if path.endswith(".sh") else [sys.executable, path, "--help"]
    res = utils.run(cmd, timeout=300, env=ENV, cwd=str(tmp_path), capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "usage" in out.lower() or "bash scripts/" in out, out[-3000:]
    assert "unknown option" not in out and "Traceback" not in out, out[-3000:]
    assert "[install] installing" not in out and "[install] ready" not in out, out[-3000:]
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
