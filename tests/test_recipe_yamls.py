"""The hydra YAMLs (configs/recipes/*.yaml, configs/arch_demo.yaml) say that every ARCH option is
spelled out (fairseq-hydra-train fills the config's defaults before it imports the --user-dir plugin,
so an option left out is not the plugin's default but missing). Checked against the plugin's own
dataclasses: every field whose name starts with arch_ (the task's) or adv_ (the criterion's) must be
in the YAML, so that a new option without a YAML entry fails here; and every value must be one the
dataclass accepts. Pure: no training."""

import dataclasses
import glob
import os

import pytest
from omegaconf import OmegaConf

from . import utils

from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (  # noqa: E402
    AdversarialLabelSmoothedCrossEntropyCriterionConfig as CriterionConfig,
)
from fairseq_arch.tasks.arch_translation import ArchTranslationConfig as TaskConfig  # noqa: E402

YAMLS = sorted(glob.glob(os.path.join(utils.REPO, "configs", "recipes", "*.yaml"))) + [
    os.path.join(utils.REPO, "configs", "arch_demo.yaml")]
# (YAML section, the plugin's dataclass, the prefix of its ARCH options, the section's _name)
SECTIONS = [("task", TaskConfig, "arch_", "arch_translation"),
            ("criterion", CriterionConfig, "adv_", "adversarial_label_smoothed_cross_entropy")]
CLAIM = "Every ARCH option (each task.arch_* and criterion.adv_* field; tests/test_recipe_yamls.py checks)"


def arch_options(dc, prefix):
    return {f.name for f in dataclasses.fields(dc) if f.name.startswith(prefix)}


def yaml_section(path, section):
    return OmegaConf.to_container(OmegaConf.load(path)[section], resolve=False)


def header(path):
    """The YAML's leading comment, one line (the claim may wrap)."""
    lines = []
    for line in open(path):
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(lines)


@pytest.mark.fast
def test_the_dataclasses_have_the_options_this_test_expects():
    """A sanity floor: the field lists are read, not empty (the newer options are among them)."""
    task, crit = arch_options(TaskConfig, "arch_"), arch_options(CriterionConfig, "adv_")
    assert {"arch_refresh_interval", "arch_rebuild_norm", "arch_neighbor_search", "arch_first_refresh_epoch"} <= task
    assert {"adv_method", "adv_lambda", "adv_probe_sentences"} <= crit
    # fairseq's own interpolated fields are not ARCH options
    assert not {"max_epoch", "save_dir", "seed"} & (task | crit)


@pytest.mark.fast
@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_yaml_spells_out_every_arch_option(path):
    assert CLAIM in header(path), f"{path}: its header should say which ARCH options it spells out"
    for section, dc, prefix, name in SECTIONS:
        values = yaml_section(path, section)
        assert values.get("_name") == name, (path, section)
        want, have = arch_options(dc, prefix), {k for k in values if k.startswith(prefix)}
        missing, unknown = sorted(want - have), sorted(have - want)
        assert not missing, f"{os.path.basename(path)}: {section} lacks {missing}: add them with their values"
        assert not unknown, f"{os.path.basename(path)}: {section} has {unknown}, which {dc.__name__} does not know"


@pytest.mark.fast
@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_yaml_values_are_ones_the_plugin_accepts(path):
    """Merged into the dataclass as fairseq does (types and choices checked by OmegaConf)."""
    for section, dc, prefix, _ in SECTIONS:
        values = {k: v for k, v in yaml_section(path, section).items() if k.startswith(prefix)}
        merged = OmegaConf.merge(OmegaConf.structured(dc), values)
        for k, v in values.items():
            got = merged[k]
            assert (got.name if hasattr(got, "name") else got) == v, (path, k, got, v)
