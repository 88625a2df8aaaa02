"""Step checkpoints of a pruning run, so that ``resume=true`` continues a killed run where it stopped.

After each finished sub-layer, a pruner that resumes (K-prune) hands its progress to
:class:`StepCheckpoints`, which keeps it in the run's staging area ``output_dir/.kprune-steps/``:

- ``step-SSS.safetensors``: the masks after sub-layer ``S`` and the weights of ``S``'s output
  projection, the only ones it tuned (nothing when the pruner does not tune);
- ``state.json``, replaced last: what identifies the run (config hash and values, device, the
  calibration sample's drawn example indices), the finished sub-layers, the remaining budget, the
  notes and stage times so far.

Each file is written under a temporary name, flushed to disk and renamed into place, so a kill at
any moment (during a save too) leaves the previous ``state.json`` and the step files it counts
intact; a temporary or later step file it does not count is ignored and overwritten. A resumed run
loads the masks of the last step file and the tuned weights of all of them, over the freshly loaded
model. A step that cannot be saved for lack of space is skipped with a note (the run goes on; the
previous checkpoint stays valid). The directory is removed when the run completes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kprune_cli.core.report import config_hash, experiment_values
from kprune_cli.core.safeguards import listed
from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProgress
from kprune_cli.pruners.common import sublayer_parts
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import NO_SPACE, STEPS_NAME, remove_tree
from kprune_cli.tasks.calibration import CalibrationSample

STATE_NAME = "state.json"
STATE_VERSION = 1


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values as ``{"pruner.mu": 64.0, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _replace_durably(staging: Path, target: Path) -> None:
    """Flush ``staging`` to disk, then rename it onto ``target`` (and flush the rename)."""
    with open(staging, "rb") as file:
        os.fsync(file.fileno())
    os.replace(staging, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _step_file(done: int) -> str:
    return f"step-{done - 1:03d}.safetensors"


def _load_step(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a step file; a :class:`UserError` if it is missing or damaged (only a fault of
    the disk does that: step files appear by renaming complete ones)."""
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise UserError(f"resume=true: the step checkpoint {path} is missing or damaged ({error}): "
                        f"pass overwrite=true to start over") from None


class StepCheckpoints:
    """The step checkpoints of the run in ``output_dir`` (see the module docstring).

    ``identity``: what must match for a resume (:func:`run_identity`); the sample's part is added
    by :meth:`bind_sample` once it is drawn. ``pruner``: its ``batch_size``, where it has one, is
    kept too (a run that ran out of GPU memory lowered it).
    """

    def __init__(self, output_dir: Path, identity: dict[str, Any], pruner: object) -> None:
        self.directory = output_dir / STEPS_NAME
        self.identity = dict(identity)
        self.pruner = pruner
        self.read = False  # whether the pruner asked for saved progress (pruners that cannot resume do not)
        self._unsaved: list[int] = []  # sub-layers whose step could not be written
        self._unsaved_reason = ""

    def _state(self) -> dict[str, Any] | None:
        """The saved state; None without one (or, after a fault of the disk, an unreadable one: the
        run starts over)."""
        try:
            return json.loads((self.directory / STATE_NAME).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def check_resumable(self) -> None:
        """A :class:`UserError` naming what differs when the saved run had another config or device."""
        state = self._state()
        if state is None:
            return
        if state.get("version") != STATE_VERSION:
            raise UserError(f"resume=true: the step checkpoints in {self.directory} were written by another kprune "
                            f"version: pass overwrite=true to start over")
        before, now = state["identity"], self.identity
        if before["config_hash"] == now["config_hash"] and before["device"] == now["device"]:
            return
        old, new = {**before["config"], "device": before["device"]}, {**now["config"], "device": now["device"]}
        differing = [f"{key}={old.get(key, '<unset>')} there, {new.get(key, '<unset>')} here"
                     for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
        raise UserError(f"resume=true: output_dir={self.directory.parent} holds a run with another config "
                        f"({listed(differing)}): resume with the same config, or pass overwrite=true to start over")

    def bind_sample(self, sample: CalibrationSample) -> None:
        """Add the sample's drawn example indices to the identity; a :class:`UserError` if a saved run
        drew other ones (its data changed)."""
        indices = sample.example_indices
        self.identity["examples"] = None if indices is None else [int(index) for index in indices]
        state = self._state()
        if state is not None and state["identity"].get("examples") != self.identity["examples"]:
            raise UserError(f"resume=true: the calibration sample drawn now differs from the one of the run in "
                            f"output_dir={self.directory.parent} (has its data changed?): pass overwrite=true "
                            f"to start over")

    def last(self, device: torch.device) -> PruneProgress | None:
        """The progress saved last (see :class:`~kprune_cli.pruners.base.StepStore`)."""
        self.read = True
        state = self._state()
        if state is None:
            return None
        tensors = _load_step(self.directory / _step_file(state["done"]))
        layers = range(len([key for key in tensors if key.startswith("masks.heads.")]))
        masks = Masks([tensors[f"masks.heads.{layer}"].to(device) for layer in layers],
                      [tensors[f"masks.neurons.{layer}"].to(device) for layer in layers])
        return PruneProgress(state["done"], masks, state["budget"], list(state["notes"]), dict(state["timing"]))

    @torch.no_grad()
    def restore(self, adapter: ModelAdapter, done: int) -> None:
        """Load the tuned output projections of sub-layers ``< done`` (those that were saved)."""
        for sublayer in range(done):
            tensors = _load_step(self.directory / _step_file(sublayer + 1))
            parts, kind = sublayer_parts(adapter, sublayer)
            projection = parts.out_proj(kind)
            for name in ("weight", "bias"):
                if name in tensors and getattr(projection, name) is not None:
                    getattr(projection, name).copy_(tensors[name])

    def save(self, adapter: ModelAdapter, progress: PruneProgress, tuned: bool) -> None:
        """Write the step file of sub-layer ``progress.done - 1``, then the state that counts it."""
        self.directory.mkdir(exist_ok=True)
        sublayer = progress.done - 1
        tensors = {f"masks.heads.{layer}": mask.detach().cpu() for layer, mask in enumerate(progress.masks.heads)}
        tensors.update({f"masks.neurons.{layer}": mask.detach().cpu()
                        for layer, mask in enumerate(progress.masks.neurons)})
        if tuned:
            parts, kind = sublayer_parts(adapter, sublayer)
            projection = parts.out_proj(kind)
            tensors["weight"] = projection.weight.detach().cpu().contiguous()
            if projection.bias is not None:
                tensors["bias"] = projection.bias.detach().cpu().contiguous()
        state = {"version": STATE_VERSION, "identity": self.identity,
                 "batch_size": getattr(self.pruner, "batch_size", None),
                 "done": progress.done, "budget": progress.budget, "notes": progress.notes,
                 "timing": progress.timing}
        step = self.directory / _step_file(progress.done)
        staging = [step.with_name(f".{step.name}.tmp"), self.directory / f".{STATE_NAME}.tmp"]
        try:
            save_file(tensors, staging[0])
            _replace_durably(staging[0], step)
            staging[1].write_text(json.dumps(state, indent=1) + "\n")
            _replace_durably(staging[1], self.directory / STATE_NAME)
        except OSError as error:
            if error.errno not in NO_SPACE:
                raise
            for path in staging:
                path.unlink(missing_ok=True)
            if not self._unsaved:
                console.print(f"[yellow]note:[/] the step checkpoint after sub-layer {sublayer} could not be written "
                              f"({error.strerror}); pruning goes on", highlight=False, soft_wrap=True)
            self._unsaved.append(sublayer)
            self._unsaved_reason = error.strerror

    def notes(self) -> list[str]:
        """For the report: the steps that could not be saved."""
        if not self._unsaved:
            return []
        return [f"the step checkpoints after sub-layers {', '.join(map(str, self._unsaved))} could not be written "
                f"({self._unsaved_reason}): a resume would have started from an earlier step"]

    def saved_steps(self) -> int:
        """How many sub-layers the saved state counts as finished (0 without one)."""
        state = self._state()
        return 0 if state is None else state["done"]

    def saved_batch_size(self) -> int | None:
        """``pruner.batch_size`` of the saved run, or None without one."""
        state = self._state()
        return None if state is None else state["batch_size"]

    def discard(self) -> None:
        """Remove the step checkpoints (the run completed, or starts over)."""
        if self.directory.is_dir():
            remove_tree(self.directory)


def run_identity(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the config (hash and values, without where
    the run writes or whether it resumes), the device type and, on CUDA, the GPU model (another
    model's kernels give other round-off)."""
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"config_hash": config_hash(cfg), "config": _flat(experiment_values(cfg)), "device": device.type, **gpu}
