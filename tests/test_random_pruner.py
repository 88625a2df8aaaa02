"""The seeded random pruner: deterministic per seed, different across seeds, within budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kprune_helpers import TINY_FLOPS, make_problem

from kprune_cli.pruners.random.pruner import RandomPruner

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _masks(result) -> list[torch.Tensor]:
    return result.masks.heads + result.masks.neurons


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.6, 0.9])
def test_budget_respected(tiny_model, rate):
    problem = make_problem(tiny_model("bert"), rate=rate)
    result = RandomPruner(seed=3).prune(problem)
    assert TINY_FLOPS.total(result.masks.kept()) <= problem.budget * (1 + 1e-9)
    assert all(torch.all((mask == 0) | (mask == 1)) for mask in _masks(result))
    if rate == 0.0:
        assert all(torch.all(mask == 1) for mask in _masks(result))


def test_deterministic_per_seed_and_different_across_seeds(tiny_model):
    problem = make_problem(tiny_model("distilbert"), rate=0.5)
    first, again, other = (RandomPruner(seed=seed).prune(problem) for seed in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(_masks(first), _masks(again)))
    assert not all(torch.equal(a, b) for a, b in zip(_masks(first), _masks(other)))


def test_weights_untouched(tiny_model):
    problem = make_problem(tiny_model("bert"), rate=0.5)
    weights = {key: value.clone() for key, value in problem.model.state_dict().items()}
    RandomPruner(seed=0).prune(problem)
    assert all(torch.equal(weights[key], value) for key, value in problem.model.state_dict().items())


def test_config_takes_the_run_seed(tmp_path):
    (tmp_path / "main.yaml").write_text("defaults:\n  - pruner: random\n  - _self_\nseed: 11\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        config = compose("main", overrides=[f"hydra.searchpath=[file://{CONFIGS}]"])
    pruner = instantiate(config.pruner)
    assert isinstance(pruner, RandomPruner) and pruner.name == "random" and pruner.seed == 11
