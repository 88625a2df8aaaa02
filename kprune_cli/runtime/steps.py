"""Step checkpoints of a pruning run, so that ``resume=true`` continues a killed run where it stopped.

The store is opaque: it keeps whatever state a pruner hands it (the pruner's ``state_dict()``, a
nested mapping of tensors and JSON values; see :class:`~kprune_cli.pruners.base.Resumable`) and
gives it back, and knows nothing of models or methods. It lives in the run's staging area
``output_dir/.kprune-steps/``:

- ``step-NNN.safetensors``, one per save ``NNN``: the state's tensors that save brought, flattened
  to dotted names (``masks.heads.0``). Entries under an *append-only* key (``save(state,
  append_only=("tuned",))``) never change once saved, so each is written once, by the save that
  first saw it; every other tensor is written again by each save;
- ``state.json``, replaced last: the format version, what identifies the run (config hash and
  values, device, the calibration sample's drawn example indices), the state's JSON values, and
  which step file holds each of its tensors.

Each file is written under a temporary name, flushed to disk and renamed into place, so a kill at
any moment (during a save too) leaves the previous ``state.json`` and the step files it names
intact; a temporary or later step file it does not name is ignored and overwritten. A save that
cannot be written for lack of space is skipped with a note (the run goes on; the previous save
stays valid). The directory is removed when the run completes.

Step checkpoints written by an older kprune (before this format) are refused with a one-line
error: start such a run again with ``overwrite=true``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError, listed
from kprune_cli.runtime.output_dir import NO_SPACE, STEPS_NAME, remove_tree

STATE_NAME = "state.json"
STATE_VERSION = 2
"""Version 1 (kprune 0.1.0 before pruners owned their state) stored K-prune's masks and tuned weights itself."""

OLDER_FORMAT = "written by an older kprune; start again with overwrite=true"


def _split(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``state`` without its tensors (nested as it is, a tensor's place holding ``None``), and its
    tensors by dotted name."""
    values: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "." in str(key):
            raise ValueError(f"step state key {key!r}: keys may not contain '.'")
        if isinstance(value, Mapping):
            values[key], inner = _split(value, f"{prefix}{key}.")
            tensors.update(inner)
        elif isinstance(value, torch.Tensor):
            values[key] = None
            tensors[f"{prefix}{key}"] = value
        else:
            values[key] = value
    return values, tensors


def _join(values: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`_split`."""
    state: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            state[key] = _join(value, tensors, name + ".")
        else:
            state[key] = tensors[name] if name in tensors else value
    return state


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


def _step_file(save: int) -> str:
    return f"step-{save:03d}.safetensors"


class StepCheckpoints:
    """The step checkpoints of the run in ``output_dir`` (see the module docstring).

    ``identity``: what must match for a resume (a JSON mapping with ``config_hash``, ``config``, its
    flattened values, and ``device``); the sample's drawn examples are added by :meth:`bind_examples`.
    ``step_name``: what one step is called in notes ("after sub-layers 0, 1 ...").
    """

    def __init__(self, output_dir: Path, identity: Mapping[str, Any], step_name: str = "sub-layer") -> None:
        self.directory = output_dir / STEPS_NAME
        self.identity = dict(identity)
        self.step_name = step_name
        self.read = False  # whether a pruner asked for saved state (pruners that cannot resume do not)
        self._unsaved: list[int] = []  # steps whose save could not be written
        self._unsaved_reason = ""

    def _saved(self) -> dict[str, Any] | None:
        """The saved ``state.json``; None without one (or, after a fault of the disk, an unreadable one:
        the run starts over)."""
        try:
            return json.loads((self.directory / STATE_NAME).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def check_resumable(self) -> None:
        """A :class:`UserError` naming what differs when the saved run had another config or device,
        or when an older kprune wrote it."""
        saved = self._saved()
        if saved is None:
            return
        if saved.get("version") != STATE_VERSION:
            raise UserError(f"resume=true: the step checkpoints in {self.directory} were {OLDER_FORMAT}")
        before, now = saved["identity"], self.identity
        if before["config_hash"] == now["config_hash"] and before["device"] == now["device"]:
            return
        old, new = {**before["config"], "device": before["device"]}, {**now["config"], "device": now["device"]}
        differing = [f"{key}={old.get(key, '<unset>')} there, {new.get(key, '<unset>')} here"
                     for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
        raise UserError(f"resume=true: output_dir={self.directory.parent} holds a run with another config "
                        f"({listed(differing)}): resume with the same config, or pass overwrite=true to start over")

    def bind_examples(self, indices: Sequence[int] | None) -> None:
        """Add the calibration sample's drawn example indices to the identity; a :class:`UserError`
        if a saved run drew other ones (its data changed)."""
        self.identity["examples"] = None if indices is None else [int(index) for index in indices]
        saved = self._saved()
        if saved is not None and saved["identity"].get("examples") != self.identity["examples"]:
            raise UserError(f"resume=true: the calibration sample drawn now differs from the one of the run in "
                            f"output_dir={self.directory.parent} (has its data changed?): pass overwrite=true "
                            f"to start over")

    def load(self) -> dict[str, Any] | None:
        """The state saved last, its tensors on the CPU, or None without one."""
        self.read = True
        saved = self._saved()
        if saved is None:
            return None
        if saved.get("version") != STATE_VERSION:
            raise UserError(f"resume=true: the step checkpoints in {self.directory} were {OLDER_FORMAT}")
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(set(saved["tensors"].values())):
            stored = self._load_file(self.directory / file)
            tensors.update({name: stored[name] for name, where in saved["tensors"].items() if where == file})
        return _join(saved["state"], tensors)

    def values(self) -> dict[str, Any] | None:
        """The JSON values of the state saved last (its tensors left out, their places ``None``), or None."""
        saved = self._saved()
        return None if saved is None or saved.get("version") != STATE_VERSION else saved["state"]

    @staticmethod
    def _load_file(path: Path) -> dict[str, torch.Tensor]:
        """The tensors of a step file; a :class:`UserError` if it is missing or damaged (only a fault of
        the disk does that: step files appear by renaming complete ones)."""
        try:
            return load_file(path)
        except (OSError, SafetensorError) as error:
            raise UserError(f"resume=true: the step checkpoint {path} is missing or damaged ({error}): "
                            f"pass overwrite=true to start over") from None

    def save(self, state: Mapping[str, Any], append_only: Sequence[str] = ()) -> None:
        """Keep ``state`` (tensors on any device, plus JSON values; ``state["done"]``: the finished steps).

        Entries of the mappings under the keys ``append_only`` are written once, by the first save
        that holds them: the caller promises that they never change afterwards.
        """
        self.directory.mkdir(exist_ok=True)
        saved = self._saved()
        saves = saved["saves"] if saved is not None and saved.get("version") == STATE_VERSION else 0
        located: dict[str, str] = dict(saved["tensors"]) if saves else {}
        values, tensors = _split(state)
        frozen = tuple(f"{key}." for key in append_only)
        file = _step_file(saves)
        written = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()
                   if not (name.startswith(frozen) and name in located)}
        located = {name: located[name] if name not in written else file for name in tensors}
        payload = {"version": STATE_VERSION, "identity": self.identity, "saves": saves + 1,
                   "tensors": located, "state": values}
        step = self.directory / file
        staging = [step.with_name(f".{step.name}.tmp"), self.directory / f".{STATE_NAME}.tmp"]
        try:
            save_file(written, staging[0])
            _replace_durably(staging[0], step)
            staging[1].write_text(json.dumps(payload, indent=1) + "\n")
            _replace_durably(staging[1], self.directory / STATE_NAME)
        except OSError as error:
            if error.errno not in NO_SPACE:
                raise
            for path in staging:
                path.unlink(missing_ok=True)
            finished = int(state["done"]) - 1
            if not self._unsaved:
                console.print(f"[yellow]note:[/] the step checkpoint after {self.step_name} {finished} could not be "
                              f"written ({error.strerror}); pruning goes on", highlight=False, soft_wrap=True)
            self._unsaved.append(finished)
            self._unsaved_reason = error.strerror

    def notes(self) -> list[str]:
        """For the report: the steps that could not be saved."""
        if not self._unsaved:
            return []
        return [f"the step checkpoints after {self.step_name}s {', '.join(map(str, self._unsaved))} could not be "
                f"written ({self._unsaved_reason}): a resume would have started from an earlier step"]

    def saved_steps(self) -> int:
        """How many steps the saved state counts as finished (0 without one)."""
        values = self.values()
        return 0 if values is None else int(values.get("done", 0))

    def discard(self) -> None:
        """Remove the step checkpoints (the run completed, or starts over)."""
        if self.directory.is_dir():
            remove_tree(self.directory)
