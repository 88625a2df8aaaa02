"""The K-prune schedule end to end on tiny models: iteration order, budgets, edge rates, task heads,
families, ablation configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kprune_helpers import TASK_OF_HEAD, TINY_FLOPS, make_problem, make_sample, sharpen
from rich.progress import Progress

from kprune_cli.models.masks import apply_masks
from kprune_cli.pruners.kprune.pruner import GPU_MICRO_BATCH_TOKENS, KPrunePruner
from kprune_cli.runtime.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _flops(masks) -> float:
    return TINY_FLOPS.total(masks.kept())


def _snapshots(problem, pruner):
    """Prune, recording a copy of the masks after each sub-layer step."""
    steps = []
    result = pruner.prune(problem, on_step=lambda s, masks: steps.append((s, masks.clone())))
    return result, steps


def _unit_masks(masks):
    """Masks by sub-layer: MHA_0, FFN_0, MHA_1, FFN_1."""
    return [mask for pair in zip(masks.heads, masks.neurons) for mask in pair]


def test_iterative_schedule_prunes_sublayer_s_only_at_step_s(tiny_model):
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.6)
    result, steps = _snapshots(problem, KPrunePruner())
    final = _unit_masks(result.masks)
    assert [s for s, _ in steps] == [0, 1, 2, 3]
    assert any((mask == 0).any() for mask in final)
    for s, masks in steps:
        for t, mask in enumerate(_unit_masks(masks)):
            if t <= s:
                assert torch.equal(mask, final[t])  # decided at step t, never revisited
            else:
                assert torch.all(mask == 1)  # not touched before its own step


def test_oneshot_schedule_decides_every_sublayer_at_once(tiny_model):
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.6)
    result, steps = _snapshots(problem, KPrunePruner(iterative=False))
    for _, masks in steps:
        assert all(torch.equal(a, b) for a, b in zip(_unit_masks(masks), _unit_masks(result.masks)))
    assert _flops(result.masks) <= problem.budget


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_final_flops_within_budget(tiny_model, rate):
    problem = make_problem(sharpen(tiny_model("bert")), rate=rate)
    result = KPrunePruner().prune(problem)
    assert _flops(result.masks) <= problem.budget * (1 + 1e-9)
    # The last step keeps the best of FFN_{L-1}'s neurons in what is left: it fills the budget
    # to within one neuron, unless it could keep them all.
    assert problem.budget - _flops(result.masks) < TINY_FLOPS.neuron or bool(result.masks.neurons[-1].all())
    assert set(result.timing) == {"teacher", "measure", "search", "tune"}
    assert all(seconds >= 0 for seconds in result.timing.values())


@pytest.mark.parametrize("iterative", [True, False])
def test_align_keeps_a_multiple_of_neurons_per_layer_within_budget(tiny_model, iterative):
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.5)
    plain = KPrunePruner(iterative=iterative).prune(problem)
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.5)
    aligned = KPrunePruner(iterative=iterative, align=8).prune(problem)
    counts = [int(mask.count_nonzero()) for mask in aligned.masks.neurons]
    assert all(count % 8 == 0 for count in counts)
    assert counts != [int(mask.count_nonzero()) for mask in plain.masks.neurons]  # the alignment did something
    assert _flops(aligned.masks) <= problem.budget * (1 + 1e-9)


def test_rate_zero_prunes_nothing_and_keeps_outputs(tiny_model):
    model = sharpen(tiny_model("bert"))
    sample = make_sample(model)
    with torch.no_grad():
        before = [model(**sample.model_inputs(batch, "cpu")).logits for batch in sample.batches]
    result = KPrunePruner().prune(make_problem(model, rate=0.0, sample=sample))
    assert all(torch.all(mask == 1) for mask in _unit_masks(result.masks))
    assert result.notes == []
    with torch.no_grad():
        after = [model(**sample.model_inputs(batch, "cpu")).logits for batch in sample.batches]
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-4)


def test_high_rate_empties_sublayers_and_the_model_still_runs(tiny_model):
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.95)
    result = KPrunePruner().prune(problem)
    assert any(torch.all(mask == 0) for mask in _unit_masks(result.masks))
    assert _flops(result.masks) <= problem.budget
    batch = problem.sample.model_inputs(problem.sample.batches[0], "cpu")
    with torch.no_grad(), apply_masks(problem.adapter, result.masks):
        assert torch.isfinite(problem.model(**batch).logits).all()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("head", ["classification", "regression", "qa"])
def test_runs_for_every_task_head_and_family(tiny_model, family, head):
    model = sharpen(tiny_model(family, "qa" if head == "qa" else "classification",
                               num_labels=1 if head == "regression" else 2))
    problem = make_problem(model, task=TASK_OF_HEAD[head], rate=0.5)
    result = KPrunePruner(micro_batch_size=5).prune(problem)
    assert [mask.shape for mask in result.masks.heads] == [(4,), (4,)]
    assert [mask.shape for mask in result.masks.neurons] == [(64,), (64,)]
    assert _flops(result.masks) <= problem.budget
    assert 0 < _flops(result.masks)


def test_deterministic(tiny_model):
    runs = []
    for _ in range(2):
        problem = make_problem(sharpen(tiny_model("bert")), rate=0.5)
        result = KPrunePruner().prune(problem)
        runs.append((result.masks, problem.model.state_dict()))
    (masks_a, weights_a), (masks_b, weights_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(_unit_masks(masks_a), _unit_masks(masks_b)))
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


def test_no_tune_leaves_weights_alone(tiny_model):
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.5)
    weights = {key: value.clone() for key, value in problem.model.state_dict().items()}
    KPrunePruner(tune=False).prune(problem)
    assert all(torch.equal(weights[key], value) for key, value in problem.model.state_dict().items())


def test_uses_a_given_progress(tiny_model):
    problem = make_problem(tiny_model("bert"), rate=0.5)
    with Progress(disable=True) as progress:
        KPrunePruner().prune(problem, progress=progress)
        (task,) = progress.tasks
        assert task.completed == task.total == 4


@pytest.mark.parametrize("kwargs", [
    {"lambda_rep": -1.0}, {"lambda_pred": 0.0, "lambda_rep": 0.0}, {"mu": 0.0}, {"temperature": -2.0},
    {"micro_batch_size": 0}, {"gradient_batch": 0}, {"align": 0}, {"gram_precision": "fp16"},
])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(UserError):
        KPrunePruner(**kwargs)


@pytest.mark.parametrize("name, changed", [
    ("kprune", {}),
    ("kprune_no_tune", {"tune": False}),
    ("kprune_pred_only", {"lambda_rep": 0.0}),
    ("kprune_rep_only", {"lambda_pred": 0.0}),
    ("kprune_oneshot", {"iterative": False}),
    ("kprune_plus", {"affine_tuning": True}),
])
def test_pruner_configs(tmp_path, name, changed):
    (tmp_path / "main.yaml").write_text("defaults:\n  - pruner: kprune\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        config = compose("main", overrides=[f"pruner={name}", f"hydra.searchpath=[file://{CONFIGS}]"])
    pruner = instantiate(config.pruner)
    paper = {"lambda_pred": 1.0, "lambda_rep": 2.5e-4, "mu": 64.0, "temperature": 2.0, "tune": True,
             "iterative": True, "gradient_batch": None, "selection": "score", "affine_tuning": False,
             "norm_refit": False}
    assert isinstance(pruner, KPrunePruner) and pruner.name == "kprune"
    assert {key: getattr(pruner, key) for key in paper} == {**paper, **changed}


def test_a_token_budget_sizes_the_micro_batches_once_and_says_so(tiny_model):
    model = sharpen(tiny_model("bert"))
    problem = make_problem(model, rate=0.5, sample=make_sample(model, num=16, seq=12, batch=8))
    longest = max(int(batch["input_ids"].shape[1]) for batch in problem.sample.batches)
    pruner = KPrunePruner(micro_batch_tokens=3 * longest + 1)
    result = pruner.prune(problem)
    assert pruner.micro_batch_size == 3 and pruner.state_dict()["micro_batch_size"] == 3
    assert any(note.startswith(f"pruner.micro_batch_tokens={3 * longest + 1}: 3 sequences per pass")
               for note in result.notes)
    assert pruner.micro_batch_tokens is None  # consumed: an out-of-memory retry halves the size it set


def test_auto_token_budget_is_for_gpus_only():
    pruner = KPrunePruner()
    assert pruner.micro_batch_tokens == "auto"
    assert pruner.token_budget(torch.device("cpu")) is None
    assert pruner.token_budget(torch.device("cuda")) == GPU_MICRO_BATCH_TOKENS
    assert KPrunePruner(micro_batch_tokens=None).token_budget(torch.device("cuda")) is None


@pytest.mark.parametrize("value", [0, -5, "many", 2.5])
def test_bad_token_budgets_are_one_line(value):
    with pytest.raises(UserError, match=r"pruner.micro_batch_tokens=.*give a positive integer, auto or null"):
        KPrunePruner(micro_batch_tokens=value)
