"""Shared fixtures and switches for the whole suite.

- ``toy_data(n_train, n_eval)``: the synthetic toy corpus (scripts/toy_corpus.py), preprocessed
  once per pytest run and size; every module asks for it instead of building its own.
- ``ARCH_REQUIRE_DATA=1`` (set by .ci/run): a test that needs ``../shared/data`` fails instead
  of skipping when it is missing (``utils.require_shared``).
- marker ``fast``: pure tests (no fairseq training, no subprocess); ``pytest -m fast`` runs only them.
"""

import os

import pytest

from . import utils


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: pure, in-process, seconds at most (pytest -m fast)")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    made = {}

    def get(n_train=120, n_eval=10):
        key = (n_train, n_eval)
        if key not in made:
            utils.quiet_logs()
            root = tmp_path_factory.mktemp(f"toy_{n_train}_{n_eval}")
            made[key] = utils.make_toy_data(str(root), n_train=n_train, n_valid=n_eval, n_test=n_eval)
        return made[key]

    return get


@pytest.fixture(scope="session")
def small_toy(toy_data):
    """120 training pairs, 10 valid, 10 test: the unit tests' corpus."""
    return toy_data(120, 10)
