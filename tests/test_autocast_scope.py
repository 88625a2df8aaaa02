"""``pruner.autocast_scope=all``: the teacher's, KPWT's and the hidden-state passes in half precision
too, their forward only (kprune_cli/models/precision.py)."""

from __future__ import annotations

import pytest
import torch
from kprune_helpers import make_problem, make_sample, sharpen

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.precision import autocast_forward
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.errors import UserError


def _linear_output_dtypes(model) -> tuple[list[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    seen: list[torch.dtype] = []
    handles = [module.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
               for module in model.modules() if isinstance(module, torch.nn.Linear)]
    return seen, handles


def test_autocast_forward_runs_the_model_in_half_precision_and_returns_float32(tiny_model):
    model = sharpen(tiny_model("bert"))
    inputs = {"input_ids": torch.randint(5, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        before = model(**inputs).logits
        seen, handles = _linear_output_dtypes(model)
        with autocast_forward(model, torch.bfloat16):
            inside = model(**inputs).logits
        for handle in handles:
            handle.remove()
        after = model(**inputs).logits
    assert set(seen) == {torch.bfloat16}
    assert inside.dtype == torch.float32 and not torch.equal(inside, before)
    torch.testing.assert_close(inside, before, rtol=0.05, atol=0.05)
    assert "forward" not in vars(model) and torch.equal(after, before)


def test_autocast_forward_restores_the_model_after_an_error_and_does_nothing_without_a_dtype(tiny_model):
    model = tiny_model("bert")
    with pytest.raises(ZeroDivisionError):
        with autocast_forward(model, torch.bfloat16):
            assert "forward" in vars(model)
            raise ZeroDivisionError
    assert "forward" not in vars(model)
    with autocast_forward(model, None):
        assert "forward" not in vars(model)


@pytest.mark.parametrize("scope, all_half", [("measure", False), ("all", True)])
def test_scope_all_runs_every_pass_of_the_pruning_in_half_precision(tiny_model, scope, all_half):
    model = sharpen(tiny_model("bert"))
    problem = make_problem(model, rate=0.5, sample=make_sample(model, num=24))
    seen, handles = _linear_output_dtypes(model)
    KPrunePruner(autocast="bf16", autocast_scope=scope).prune(problem)
    for handle in handles:
        handle.remove()
    assert torch.bfloat16 in seen
    assert (torch.float32 not in seen) == all_half
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_scope_all_tunes_close_to_the_float32_passes(tiny_model):
    weights = {}
    for scope in ("measure", "all"):
        model = sharpen(tiny_model("bert"))
        problem = make_problem(model, rate=0.5, sample=make_sample(model, num=48))
        result = KPrunePruner(autocast="bf16", autocast_scope=scope).prune(problem)
        projection = get_adapter(model).layers()[1].out_proj("ffn")
        weights[scope] = (torch.cat(result.masks.heads + result.masks.neurons), projection.weight.detach().clone())
    masks_measure, tuned_measure = weights["measure"]
    masks_all, tuned_all = weights["all"]
    assert float(((masks_measure != 0) == (masks_all != 0)).float().mean()) >= 0.95
    assert not torch.equal(tuned_measure, tuned_all)  # the KPWT passes did run in bf16
    relative = (tuned_all - tuned_measure).norm() / tuned_measure.norm()
    assert float(relative) < 0.05


@pytest.mark.parametrize("options, match", [
    ({"autocast_scope": "everything", "autocast": "bf16"}, "choose measure or all"),
    ({"autocast_scope": "all"}, "needs pruner.autocast=bf16 or fp16")])
def test_bad_scopes_are_one_line(options, match):
    with pytest.raises(UserError, match=match):
        KPrunePruner(**options)
