"""The report's config hash names the experiment, not where it was written."""

from __future__ import annotations

from omegaconf import OmegaConf

from kprune_cli.core.report import config_hash


def test_config_hash_ignores_the_output_directory_but_not_the_experiment():
    base = {"rate": 0.5, "seed": 0, "task": {"name": "mrpc"}, "output_dir": "a", "overwrite": False}
    moved = {**base, "output_dir": "b", "overwrite": True}
    other_rate = {**base, "rate": 0.6}

    assert config_hash(OmegaConf.create(base)) == config_hash(OmegaConf.create(moved))
    assert config_hash(OmegaConf.create(base)) != config_hash(OmegaConf.create(other_rate))
