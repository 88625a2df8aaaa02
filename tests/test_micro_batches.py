"""One meaning per batch knob: ``micro_batch_size`` is memory only (results do not depend on it beyond
float summation order), the method's ``gradient_batch`` never changes behind the user's back (not by
the out-of-memory retry either), and sample-sized caches that cannot fit a GPU are refused up front."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kprune_helpers import make_problem, make_sample, sharpen
from test_kwon import labelled

from kprune_cli.core.safeguards import cache_bytes, prune_with_memory_retry
from kprune_cli.models.adapters import get_adapter
from kprune_cli.pruners.common.teacher import micro_batches
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kwon import fisher
from kprune_cli.pruners.kwon.fisher import fisher_importance, labelled_batches, mask_gradients
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.runtime.errors import UserError


def _sequences_of(batches):
    """Each micro-batch's sequences as their draw indices."""
    return [batch["draw_index"].tolist() for batch in batches]


def test_micro_batches_split_and_merge_calibration_batches(tiny_model):
    sample = make_sample(tiny_model("bert"), num=20, batch=8)  # calibration batches of 8, 8, 4
    split = micro_batches(sample, 3, "cpu", with_draw_index=True)
    assert [len(b) for b in _sequences_of(split)] == [3, 3, 2] * 2 + [3, 1]
    merged = micro_batches(sample, 16, "cpu", with_draw_index=True)
    assert [len(b) for b in _sequences_of(merged)] == [16, 4]
    assert sum(_sequences_of(merged), []) == list(range(20))
    for batch, original in zip(micro_batches(sample, None, "cpu"), sample.batches):
        assert int(batch["attention_mask"].sum()) == int(original["attention_mask"].sum())
    # merged: every real token kept, padded to the longest, all-padding columns dropped
    assert int(merged[0]["attention_mask"].sum()) == sum(int(b["attention_mask"].sum()) for b in sample.batches[:2])
    assert merged[0]["attention_mask"][:, -1].any()


def test_kprune_masks_do_not_depend_on_the_micro_batch(tiny_model):
    """8 splits the calibration batches of 16, 32 merges them: the same masks, weights equal up to
    float summation order."""
    runs = []
    for size in (8, 32):
        model = sharpen(tiny_model("bert"))
        problem = make_problem(model, rate=0.6, sample=make_sample(model, num=48, batch=16))
        runs.append((KPrunePruner(micro_batch_size=size).prune(problem), model.state_dict()))
    (small, small_weights), (large, large_weights) = runs
    for got, want in zip(small.masks.heads + small.masks.neurons, large.masks.heads + large.masks.neurons):
        assert torch.equal(got, want)
    for name, tensor in small_weights.items():
        torch.testing.assert_close(tensor, large_weights[name], rtol=1e-4, atol=1e-5)


def test_kwon_fisher_does_not_depend_on_the_micro_batch(tiny_model):
    model = sharpen(tiny_model("bert"))
    adapter = get_adapter(model)
    batches = labelled_batches(labelled(make_sample(model, num=24)), 12, "cpu")  # gradient batches of 12
    whole = mask_gradients(model, adapter, batches)
    for micro in (5, 1):
        split = mask_gradients(model, adapter, batches, micro_batch_size=micro)
        for s in whole:
            torch.testing.assert_close(split[s], whole[s], rtol=1e-4, atol=1e-7)
        importance, expected = fisher_importance(split), fisher_importance(whole)
        for s in expected:
            torch.testing.assert_close(importance[s], expected[s], rtol=1e-4, atol=1e-10)


def test_kwon_micro_batches_give_the_same_masks(tiny_model):
    results = []
    for micro in (None, 3):
        model = sharpen(tiny_model("bert"))
        problem = make_problem(model, rate=0.5, sample=labelled(make_sample(model, num=24)))
        results.append(KwonPruner(gradient_batch=12, micro_batch_size=micro).prune(problem))
    whole, split = results
    for got, want in zip(split.masks.heads + split.masks.neurons, whole.masks.heads + whole.masks.neurons):
        assert torch.equal(got != 0, want != 0)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert whole.settings == split.settings == {"gradient_batch": 12}


def _on_cpu(monkeypatch, pruner_class):
    """Let a problem on a (faked) CUDA device run on the CPU inside ``pruner_class.prune``, and let the
    caches fit the faked device."""
    real_prune = pruner_class.prune
    monkeypatch.setattr(pruner_class, "prune", lambda self, problem, *args: real_prune(
        self, dataclasses.replace(problem, device=torch.device("cpu")), *args))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))


def test_kwon_out_of_memory_halves_the_micro_batch_never_the_gradient_batch(tiny_model, monkeypatch):
    """Review B1: Kwon on SQuAD (official gradient batch 12, calibration batches of 32) out of memory
    once: the retry runs micro-batches of 6 in gradient batches of 12, not gradient batches of 16."""
    model = sharpen(tiny_model("bert", "qa"))
    sample = labelled(make_sample(model, num=32, batch=32), "qa")
    problem = dataclasses.replace(make_problem(model, task="squad", rate=0.5, sample=sample),
                                  device=torch.device("cuda"))
    _on_cpu(monkeypatch, KwonPruner)
    gradient_batches, passes = [], []
    real_batches = fisher.labelled_batches
    monkeypatch.setattr("kprune_cli.pruners.kwon.pruner.labelled_batches", lambda sample, size, device: (
        gradient_batches.append(size) or real_batches(sample, size, device)))

    def out_of_memory_once(module, args, kwargs):
        passes.append(int(kwargs["input_ids"].shape[0]))
        if len(passes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.register_forward_pre_hook(out_of_memory_once, with_kwargs=True)
    pruner, notes = KwonPruner(), []
    try:
        result = prune_with_memory_retry(pruner, problem, notes)
    finally:
        hook.remove()
    assert gradient_batches == [12, 12] and result.settings == {"gradient_batch": 12}
    assert pruner.gradient_batch is None and pruner.micro_batch_size == 6
    assert passes[0] == 12 and set(passes[1:]) == {6, 2}  # 32 = 12 + 12 + 8 in draw order; 8 = 6 + 2
    assert len(notes) == 1 and "pruner.micro_batch_size=12" in notes[0] and "micro_batch_size=6" in notes[0]


def test_kprune_out_of_memory_halves_its_micro_batch(tiny_model, monkeypatch):
    model = sharpen(tiny_model("bert"))
    problem = dataclasses.replace(make_problem(model, rate=0.5, sample=make_sample(model, num=16, batch=16)),
                                  device=torch.device("cuda"))
    _on_cpu(monkeypatch, KPrunePruner)
    passes = []

    def out_of_memory_once(module, args, kwargs):
        passes.append(int(kwargs["input_ids"].shape[0]))
        if len(passes) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.register_forward_pre_hook(out_of_memory_once, with_kwargs=True)
    pruner, notes = KPrunePruner(micro_batch_size=None), []
    try:
        result = prune_with_memory_retry(pruner, problem, notes)
    finally:
        hook.remove()
    assert pruner.micro_batch_size == 8 and passes[:3] == [16, 8, 8]
    assert result.settings["gradient_batch"] == 32 and "pruner.micro_batch_size=16" in notes[0]


def test_caches_that_cannot_fit_the_gpu_are_one_error_naming_the_sample_size(tiny_model, monkeypatch):
    model = tiny_model("bert")
    problem = dataclasses.replace(make_problem(model, sample=make_sample(model, num=16, seq=12)),
                                  device=torch.device("cuda"))
    assert cache_bytes(problem) == 3 * 16 * 12 * 32 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (cache_bytes(problem) - 1, 2**40))
    pruner = KPrunePruner()
    with pytest.raises(UserError, match=r"lower calibration\.num_tokens"):
        prune_with_memory_retry(pruner, problem, [])
    assert pruner.state_dict()["done"] == 0  # refused before any work
    _on_cpu(monkeypatch, KPrunePruner)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (cache_bytes(problem), 2**40))
    assert prune_with_memory_retry(pruner, problem, []).masks is not None
