"""Every module of the plugin, the scripts, the recipes and the benchmarks imports in the
environment that scripts/install.sh made: a package that the code imports but the install does
not provide fails here, fast, with its name (CI once went green while a fresh machine lacked
sacremoses)."""

import glob
import importlib
import importlib.util
import os
import sys

import pytest

from . import utils


def _files(*patterns):
    out = []
    for pat in patterns:
        out += sorted(glob.glob(os.path.join(utils.REPO, pat), recursive=True))
    return [os.path.relpath(f, utils.REPO) for f in out if "__pycache__" not in f]


PACKAGE_MODULES = _files("fairseq_arch/**/*.py", "benchmarks/**/*.py")
SCRIPTS = _files("scripts/**/*.py")


@pytest.mark.fast
def test_the_lists_are_not_empty():
    assert len(PACKAGE_MODULES) > 10 and len(SCRIPTS) > 5, (PACKAGE_MODULES, SCRIPTS)


@pytest.mark.fast
@pytest.mark.parametrize("path", PACKAGE_MODULES)
def test_package_module_imports(path):
    name = path[:-3].replace(os.sep, ".")
    if name.endswith(".__init__"):
        name = name[: -len(".__init__")]
    importlib.import_module(name)  # benchmarks/__main__.py has a __main__ guard


@pytest.mark.fast
@pytest.mark.parametrize("path", SCRIPTS)
def test_script_imports(path):
    """Scripts are imported as modules (their main() is not run: each has a __main__ guard)."""
    full = os.path.join(utils.REPO, path)
    src = open(full).read()
    assert 'if __name__ == "__main__"' in src, f"{path} runs on import: give it a __main__ guard"
    folder = os.path.dirname(full)
    sys.path.insert(0, folder)  # scripts import their siblings (train.py imports common ones)
    try:
        spec = importlib.util.spec_from_file_location("_script_" + path.replace(os.sep, "_")[:-3], full)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)


def _imported_tops(path):
    """Top-level names of every absolute import in a file, function-level (lazy) ones included."""
    import ast

    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


ALL_PY = _files("fairseq_arch/**/*.py", "benchmarks/**/*.py", "scripts/**/*.py", "tests/**/*.py", "setup.py")


@pytest.mark.fast
@pytest.mark.parametrize("path", ALL_PY)
def test_every_import_is_installed_lazy_ones_too(path):
    """Imports inside functions (sacremoses in the recipes, matplotlib in the plots) are only
    run by some commands: resolve each one's package without running the code."""
    full = os.path.join(utils.REPO, path)
    local = {os.path.splitext(f)[0] for f in os.listdir(os.path.dirname(full))}
    local |= {"fairseq_arch", "benchmarks", "tests"}
    missing = [f"{name} (line {line})" for name, line in _imported_tops(full)
               if name not in local and importlib.util.find_spec(name) is None]
    assert not missing, f"{path} imports packages that the install does not provide: {missing}"
