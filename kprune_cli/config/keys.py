"""A mistyped key on the command line (``kprune run rtae=0.5``) as one line naming the closest known
keys, instead of Hydra's message, which advises ``+rtae=0.5`` (that would only hide the typo)."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig

from kprune_cli.runtime.errors import UserError

RENAMED_KEYS = {
    "pruner.batch_size": "it was split in two: pruner.micro_batch_size (sequences per forward/backward pass, memory "
                         "only) and pruner.gradient_batch (the method's gradient batch, what pruner=kwon's "
                         "batch_size was)",
}
"""Keys of earlier kprune versions, and what took their place."""

MODEL_KEYS = ("model.path", "checkpoint")
"""The two names of a command's model: ``kprune run`` and ``finetune`` take ``model.path`` (the
``model`` group), ``eval``, ``export``, ``bench`` and ``latency-table`` take ``checkpoint``."""


def check_known_keys(config_dir: Path, config_name: str, overrides: list[str]) -> None:
    """A :class:`UserError` for the first ``key=value`` of ``overrides`` whose key is not in the
    config ``config_name`` composed with the overrides' group choices.

    A group option without a file (``pruner=kprnue``) is one line naming the group's options. Left to
    Hydra: flags, ``+key`` / ``++key`` / ``~key``, ``hydra.*`` keys, overrides it cannot parse or
    compose, and keys of a group swept over several options (``-m pruner=kprune,kwon``:
    the options may differ in keys).
    """
    parsed = _parse(overrides)
    if parsed is None:
        return
    groups = [override for override in parsed if (config_dir / override.key_or_group).is_dir()]
    for override in groups:
        if override.key_or_group.split("/")[0] != "hydra":  # Hydra's own groups have options from its plugins
            _check_group_options(config_dir, override)
    swept = {override.key_or_group.replace("/", ".") for override in groups if override.is_sweep_override()}
    choices = tuple(override.input_line for override in groups if not override.is_sweep_override())
    known = _known_keys(config_dir, config_name, choices)
    if known is None:  # a bad group option or value: Hydra reports it itself
        return
    for override in parsed:
        key = override.key_or_group
        if (override.type != OverrideType.CHANGE or override.package is not None or key in known
                or override in groups or key.split(".")[0] == "hydra" or key.split(".")[0] in swept):
            continue
        if key in RENAMED_KEYS:
            raise UserError(f"{override.input_line}: unknown key {key!r}: {RENAMED_KEYS[key]}")
        if key in MODEL_KEYS and (other := next(name for name in MODEL_KEYS if name != key)) in known:
            raise UserError(f"{override.input_line}: unknown key {key!r}: kprune {config_name} takes its model "
                            f"as {other}=")
        leaves = sorted(name for name in known if not any(other.startswith(name + ".") for other in known))
        closest = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(closest)}?" if closest else "no key of the config is close to it"
        raise UserError(f"{override.input_line}: unknown key {key!r}, {hint} "
                        f"(`kprune {config_name} --help` lists every key)")


def _check_group_options(config_dir: Path, override: Override) -> None:
    """A :class:`UserError` naming the options of ``override``'s group when one it chooses (``pruner=kprnue``,
    or one of a sweep's ``pruner=kprune,kwn``) has no file, instead of Hydra's many-line message."""
    group = override.key_or_group
    chosen = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    options = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
    for option in chosen:
        if isinstance(option, str) and option not in options:
            closest = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
            hint = f"did you mean {closest[0]}? " if closest else ""
            raise UserError(f"{group}={option}: no such {group.replace('/', ' ')}: {hint}"
                            f"choose one of {', '.join(options)}")


@lru_cache(maxsize=64)
def _known_keys(config_dir: Path, config_name: str, group_choices: tuple[str, ...]) -> frozenset[str] | None:
    """Every dotted key of the config ``config_name`` composed with ``group_choices`` (None if it
    does not compose). Cached: the keys depend on the group choices alone, and a composition
    costs about 0.2 s, which an in-process caller running many commands (the tests, a Python
    sweep) would otherwise pay again for each one."""
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(group_choices))
    except Exception:
        return None
    return frozenset(_full_keys(cfg))


def _parse(overrides: list[str]) -> list[Override] | None:
    """The ``key=value`` overrides (flags dropped), or None if Hydra cannot parse one."""
    parser = OverridesParser.create()
    try:
        return [parser.parse_override(arg) for arg in overrides if not arg.startswith("-") and "=" in arg]
    except HydraException:
        return None


def _full_keys(cfg: DictConfig, prefix: str = "") -> set[str]:
    """Every dotted key of ``cfg``, nested ones too (values are not resolved)."""
    keys = set()
    for name in cfg.keys():
        key = f"{prefix}{name}"
        keys.add(key)
        child = cfg._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys |= _full_keys(child, key + ".")
    return keys
