"""scripts/install.sh in a user's own active environment: a fairseq >= 0.12 and any faiss that
are there are kept (said, with what would have been installed), a fairseq older than 0.12
stops the install before anything is installed.

The user's environment is a fresh venv holding stand-in ``fairseq`` and ``faiss`` packages
(with their distribution metadata); every other package the plugin needs (torch, numpy, ...)
is made visible to it through a .pth file pointing at a folder of links into this test
environment's site-packages, so that the install needs no download of them."""

import os
import subprocess
import sys
import sysconfig

from . import utils

SKIP_PREFIXES = ("fairseq", "ve_fairseq", "faiss", "__editable__", "fairseq_arch", "_fairseq_arch")


def _dist(site, name, version, top, code):
    """A package ``top`` with ``code`` and an installed distribution ``name`` that owns it."""
    os.makedirs(os.path.join(site, top))
    with open(os.path.join(site, top, "__init__.py"), "w") as f:
        f.write(code)
    info = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info)
    files = {"METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", "INSTALLER": "pip\n",
             "top_level.txt": f"{top}\n",
             "RECORD": f"{top}/__init__.py,,\n{os.path.basename(info)}/METADATA,,\n{os.path.basename(info)}/RECORD,,\n"}
    for fname, text in files.items():
        with open(os.path.join(info, fname), "w") as f:
            f.write(text)


def _user_env(tmp_path, fairseq_version):
    env_dir = tmp_path / "user-env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    _dist(site, "fairseq", fairseq_version, "fairseq", f"__version__ = '{fairseq_version}'\n")
    _dist(site, "faiss-gpu-cu12", "1.8.0", "faiss", "__version__ = 'stand-in'\n")
    ours = sysconfig.get_paths()["purelib"]
    shared = tmp_path / "shared-site"
    shared.mkdir()
    for name in os.listdir(ours):
        if not name.startswith(SKIP_PREFIXES) and not name.endswith(".pth"):
            os.symlink(os.path.join(ours, name), shared / name)
    with open(os.path.join(site, "zz-shared.pth"), "w") as f:
        f.write(str(shared) + "\n")
    return env_dir, site


def _install(env_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "ARCH_SKIP_INSTALL")}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir}/bin:{env['PATH']}", **extra)
    return utils.run(["bash", os.path.join(utils.REPO, "scripts", "install.sh")], timeout=900, env=env,
                     capture_output=True, text=True)


def test_install_keeps_the_users_fairseq_and_faiss(tmp_path):
    env_dir, site = _user_env(tmp_path, "0.12.2")
    before = {p: open(os.path.join(site, p, "__init__.py")).read() for p in ("fairseq", "faiss")}
    out = _install(env_dir)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "keeping the installed faiss-gpu-cu12 (would have installed faiss-cpu; ARCH_INSTALL_REPLACE=1" in text, text
    assert "keeping the installed fairseq 0.12.2 (fairseq; would have installed ve-fairseq==0.12.3" in text, text
    assert "uninstalling" not in text, text
    for p, code in before.items():
        assert open(os.path.join(site, p, "__init__.py")).read() == code
    names = os.listdir(site)
    assert not any(n.startswith(("ve_fairseq", "faiss_cpu")) for n in names), names
    assert "fairseq 0.12.2, faiss stand-in" in text  # the install's closing line imports what it kept


def test_install_stops_on_a_fairseq_older_than_0_12_before_installing_anything(tmp_path):
    env_dir, site = _user_env(tmp_path, "0.10.2")
    names = sorted(os.listdir(site))
    out = _install(env_dir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "fairseq 0.10.2 (fairseq) in" in out.stderr and "ARCH_INSTALL_REPLACE=1" in out.stderr
    assert "Nothing was installed." in out.stderr
    assert sorted(os.listdir(site)) == names
