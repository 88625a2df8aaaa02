"""Fuzzing ``kprune run`` with random overrides: every outcome is a finished run (exit 0, report
written) or a clean user error (exit 2, one ``error:`` line, no traceback, nothing written)."""

from __future__ import annotations

import itertools
import json

import datasets.config
import huggingface_hub.constants
import pytest
from conftest import kprune, write_mrpc_data, write_tiny_checkpoint
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from test_cli import run_args

# Values that a key accepts (so that many examples get into the job), and anything at all.
VALID = {
    "rate": st.floats(0.01, 0.99).map(str),
    "seed": st.integers(0, 2**32 - 1).map(str),
    "device": st.sampled_from(["cpu", "auto"]),
    "eval_batch_size": st.integers(1, 10**6).map(str),
    "overwrite": st.sampled_from(["true", "false"]),
    "calibration.num_tokens": st.integers(1, 10**9).map(str),
    "calibration.batch_size": st.integers(1, 10**4).map(str),
    "calibration.seed": st.integers(0, 99).map(str),
    "task": st.sampled_from(["mrpc", "stsb", "squad", "demo"]),
    "pruner": st.sampled_from(["kprune", "kprune_oneshot", "kprune_no_tune", "kwon", "magnitude", "random"]),
    "pruner.micro_batch_size": st.sampled_from(["1", "3", "null"]),
    "pruner.tune": st.sampled_from(["true", "false"]),
    "pruner.mu": st.floats(0.001, 1000).map(str),
    "pruner.teacher": st.sampled_from(["original", "intermediate"]),
}
# Keys of configs/run.yaml and its groups, and keys no config has.
KEYS = [*VALID, "data_dir", "model.path", "task.name",
        "junk", "rate.deep", "calibration.nope", "+extra", "~seed", "~pruner", "hydra.nope", "pruner._target_"]
WORDS = ["", "null", "true", "false", "???", "abc", "-1", "0", "1", "0.5", "1e400", "-inf", "nan", "[1,2]", "{a: 1}",
         "${seed}", "${nope}", "'quoted'", "ünïcødé", "💥", "cuda", "cpu", "auto", "kprune", "kwon", "magnitude",
         "random", "mrpc", "stsb", "squad", "demo", "intermediate", "/nonexistent/kprune/path", "[/red]",
         "(", "a,b", "=", "'unterminated", "${", "\\", "x y"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
ANY_VALUE = st.one_of(
    st.sampled_from(WORDS),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    TEXT,
    TEXT.map(lambda text: "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"),
)
OVERRIDE = st.sampled_from(KEYS).flatmap(
    lambda key: st.one_of(VALID.get(key, st.nothing()), ANY_VALUE).map(lambda value: f"{key}={value}"))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny checkpoint and data, a counter for fresh output directories, and no hub access."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        # A value that reads as a hub id or data_dir=null must fail fast instead of waiting on the network.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setenv("KPRUNE_CACHE", str(root / "cache"))  # task=demo with data_dir=null makes its data there
        yield write_tiny_checkpoint(root / "model"), write_mrpc_data(root / "data"), root, itertools.count()


# Slow: 25 whole runs. No "explain" phase: it traces the test, and Hydra, taking the tracer for a debugger, then
# re-raises errors instead of reporting them.
@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(overrides=st.lists(OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_finish_or_fail_cleanly(overrides, fixtures, capsys):
    checkpoint, data, root, counter = fixtures
    output = root / f"out{next(counter)}"
    capsys.readouterr()
    code = kprune(*run_args(checkpoint, data, output, "pruner=magnitude", *overrides))
    err = capsys.readouterr().err
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how many runs finished
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    if code == 0:
        report = json.loads((output / "report.json").read_text())
        assert 0.0 < report["rate"] < 1.0 and (output / "pruned" / "model.safetensors").is_file()
    else:
        assert err.strip(), "exit 2 without a message"
        assert not output.exists() or not any(output.iterdir()), sorted(p.name for p in output.iterdir())


def test_fuzzed_values_reach_the_job(fixtures, capsys):
    """The fuzz's base command line works: a plain run finishes (else every example would be an error)."""
    checkpoint, data, root, counter = fixtures
    output = root / f"out{next(counter)}"
    assert kprune(*run_args(checkpoint, data, output, "pruner=magnitude")) == 0
    assert (output / "report.json").is_file()
