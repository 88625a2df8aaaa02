"""Fine-tuning dense baselines: a tiny BERT on a slice of the demo task."""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from rich.progress import Progress
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertTokenizer, PreTrainedModel

from kprune_cli.cli.finetune import read_settings, run_finetune
from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.core.evaluation import evaluate_model
from kprune_cli.core.finetune import FinetuneRecipe, finetune
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import atomic_directory
from kprune_cli.tasks.batches import FeatureBatches
from kprune_cli.tasks.data import load_task_data, tokenize_split
from kprune_cli.tasks.demo import write_demo_data
from kprune_cli.tasks.spec import get_task

TASK = get_task("demo")
RECIPE = FinetuneRecipe(epochs=8, learning_rate=2e-3, batch_size=16, warmup_ratio=0.1, weight_decay=0.01,
                        max_steps=None, seed=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=0, num_train=256, num_validation=64)


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> BertTokenizer:
    """A word-level BERT tokenizer whose vocabulary is exactly the demo task's words."""
    data = load_task_data(TASK, data_dir=str(demo_dir))
    words = sorted({w for split in data.values() for s in split["sentence"] for w in re.findall(r"\w+|[^\w\s]", s)})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


def tiny_bert(tokenizer: BertTokenizer, seed: int = 0, dropout: float = 0.0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return AutoModelForSequenceClassification.from_config(config)


def mean_train_loss(model: PreTrainedModel, tokenizer: BertTokenizer, demo_dir: Path) -> float:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    features = tokenize_split(TASK, data["train"], tokenizer, for_training=True)
    batch = FeatureBatches(features, tokenizer).batch(range(len(features)))
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.fixture(scope="module")
def trained(tokenizer: BertTokenizer, demo_dir: Path) -> tuple[PreTrainedModel, dict[str, float], float]:
    """A tiny BERT fine-tuned in float32 by RECIPE, its dev metrics, and its training loss before."""
    model = tiny_bert(tokenizer)
    before = mean_train_loss(model, tokenizer, demo_dir)
    metrics = finetune(model, tokenizer, TASK, load_task_data(TASK, data_dir=str(demo_dir)), RECIPE, device="cpu")
    return model, metrics, before


def test_finetuning_lowers_the_training_loss_and_reports_dev_metrics(trained, tokenizer, demo_dir: Path) -> None:
    model, metrics, before = trained
    after = mean_train_loss(model, tokenizer, demo_dir)
    assert after < 0.8 * before
    assert set(metrics) == {"accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert not model.training


def test_same_seed_same_weights_other_seed_other_weights(tokenizer, demo_dir: Path) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    run = partial(finetune, tokenizer=tokenizer, task=TASK, datasets=data, device="cpu")
    models = [tiny_bert(tokenizer, dropout=0.1) for _ in range(3)]
    for model, seed, global_seed in zip(models, (5, 5, 6), (100, 200, 100)):
        torch.manual_seed(global_seed)  # the global RNG state must not matter
        run(model, recipe=dataclasses.replace(RECIPE, epochs=1, seed=seed))
    weights = [list(model.state_dict().values()) for model in models]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, c) for a, c in zip(weights[0], weights[2]))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_training_learns_and_differs_from_float32(trained, tokenizer, demo_dir: Path,
                                                                  dtype: str) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    model = tiny_bert(tokenizer)
    before = mean_train_loss(model, tokenizer, demo_dir)
    seen = []
    hook = model.classifier.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    finetune(model, tokenizer, TASK, data, dataclasses.replace(RECIPE, dtype=dtype), device="cpu")
    hook.remove()
    assert set(seen[:1]) == {torch.bfloat16 if dtype == "bf16" else torch.float16}
    assert mean_train_loss(model, tokenizer, demo_dir) < 0.8 * before
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(trained[0].state_dict().values(), model.state_dict().values()))


def test_finetune_keeps_the_global_rng_state(tokenizer, demo_dir: Path) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    model = tiny_bert(tokenizer, dropout=0.1)
    state = torch.get_rng_state()
    finetune(model, tokenizer, TASK, data, dataclasses.replace(RECIPE, max_steps=2), device="cpu")
    assert torch.equal(torch.get_rng_state(), state)


def test_max_steps_replaces_epochs(tokenizer, demo_dir: Path) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    with Progress(disable=True) as progress:
        finetune(tiny_bert(tokenizer), tokenizer, TASK, data, dataclasses.replace(RECIPE, max_steps=3),
                 device="cpu", progress=progress)
        training = progress.tasks[0]
    assert training.total == 3 and training.completed == 3


class RecordingProgress(Progress):
    """A silent Progress that records each update as (completed, description)."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.updates: list[tuple[float | None, str | None]] = []

    def update(self, task_id, **changes) -> None:
        super().update(task_id, **changes)
        self.updates.append((changes.get("completed"), changes.get("description")))


def test_the_running_loss_is_read_only_every_loss_read_every_steps_and_at_the_last(tokenizer, demo_dir: Path
                                                                                   ) -> None:
    """Reading the loss is a host sync on a GPU: the bar shows it every LOSS_READ_EVERY steps only."""
    from kprune_cli.core.finetune import LOSS_READ_EVERY

    data = load_task_data(TASK, data_dir=str(demo_dir))
    steps = LOSS_READ_EVERY + 3
    with RecordingProgress() as progress:
        finetune(tiny_bert(tokenizer), tokenizer, TASK, data, dataclasses.replace(RECIPE, max_steps=steps),
                 device="cpu", progress=progress)
    training = [(done, text) for done, text in progress.updates if done is not None][:steps]
    assert [done for done, _ in training] == list(range(1, steps + 1))
    shown = {done: text for done, text in training if text is not None}
    assert sorted(shown) == [LOSS_READ_EVERY, steps]
    losses = [float(re.search(r"loss (\d+\.\d+)", text).group(1)) for text in shown.values()]
    assert all(0 < loss < 10 for loss in losses)


def test_atomic_directory_leaves_nothing_when_the_body_fails(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def run_config(model_dir: Path, demo_dir: Path, output_dir: Path, overwrite: bool = False,
               extra: tuple[str, ...] = ()) -> DictConfig:
    """configs/finetune.yaml as the CLI composes it, pointed at the tiny model and data, with ``extra`` overrides."""
    overrides = [f"model.path={model_dir}", f"data_dir={demo_dir}", f"output_dir={output_dir}",
                 f"overwrite={overwrite}", "device=cpu",
                 *(f"{key}={'null' if value is None else value}" for key, value in dataclasses.asdict(RECIPE).items()),
                 *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("finetune", overrides=overrides)


def test_read_settings_turns_the_config_into_checked_values(tmp_path: Path) -> None:
    settings = read_settings(run_config(tmp_path / "model", tmp_path / "data", tmp_path / "out",
                                        extra=("max_length=32",)))
    assert settings.recipe == RECIPE
    assert settings.task == dataclasses.replace(TASK, max_length=32)
    assert (settings.model_path, settings.data_dir) == (str(tmp_path / "model"), str(tmp_path / "data"))
    assert (settings.output_dir, settings.overwrite, settings.device) == (tmp_path / "out", False, torch.device("cpu"))


@pytest.mark.parametrize("override, message", [
    ("epochs=-1", "epochs=-1 is not allowed: give a number > 0"),
    ("epochs=0", "epochs=0 is not allowed: give a number > 0"),
    ("epochs=true", "epochs=True is not allowed: give a number > 0"),
    ("learning_rate=0", "learning_rate=0 is not allowed: give a number > 0"),
    ("learning_rate=nan", "learning_rate=nan is not allowed: give a number > 0"),
    ("batch_size=abc", "batch_size='abc' is not allowed: give an integer >= 1"),
    ("batch_size=2.5", "batch_size=2.5 is not allowed: give an integer >= 1"),
    ("warmup_ratio=2", "warmup_ratio=2 is not allowed: give a number from 0 to 1"),
    ("weight_decay=-0.1", "weight_decay=-0.1 is not allowed: give a number >= 0"),
    ("max_steps=0", "max_steps=0 is not allowed: give an integer >= 1 or null"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0 is not allowed: give an integer >= 1"),
    ("max_length=0", "max_length=0 is not allowed: give an integer >= 1 or null"),
    ("seed=-1", "seed=-1 is not allowed: give an integer from 0 to 4294967295"),
    ("overwrite=maybe", "overwrite='maybe' is not allowed: give true or false"),
    ("dtype=fp64", "dtype='fp64' is not allowed: give fp32, bf16, fp16"),
    ("~epochs", "the config has no epochs: it is required"),
])
def test_a_bad_config_value_is_a_one_line_user_error_before_any_work(tmp_path: Path, override: str,
                                                                     message: str) -> None:
    cfg = run_config(tmp_path / "model", tmp_path / "data", tmp_path / "out", extra=(override,))
    with pytest.raises(UserError) as caught:
        run_finetune(cfg)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing loaded, trained or written


@pytest.fixture
def pretrained_dir(tmp_path: Path, tokenizer) -> Path:
    """A 'pretrained' tiny encoder (no task head) with its tokenizer, as `kprune finetune` starts from."""
    path = tmp_path / "pretrained"
    tiny_bert(tokenizer, seed=1).bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_run_finetune_writes_a_loadable_directory_with_its_dev_metrics(pretrained_dir, demo_dir, tmp_path) -> None:
    output = run_finetune(run_config(pretrained_dir, demo_dir, tmp_path / "out"))
    saved = json.loads((output / "dev_metrics.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    tokenizer = BertTokenizer.from_pretrained(output)
    data = load_task_data(TASK, data_dir=str(demo_dir))
    assert evaluate_model(model, tokenizer, TASK, data, "cpu") == pytest.approx(saved)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_run_finetune_refuses_a_non_empty_output_dir_unless_overwrite(pretrained_dir, demo_dir, tmp_path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_finetune(run_config(pretrained_dir, demo_dir, output))
    assert (output / "precious.txt").read_text() == "keep me"

    run_finetune(run_config(pretrained_dir, demo_dir, output, overwrite=True))
    assert not (output / "precious.txt").exists()
    assert (output / "dev_metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pretrained"]  # no staging or backup left


def test_run_finetune_is_deterministic_for_a_seed_head_included(pretrained_dir, demo_dir, tmp_path) -> None:
    weights = [load_file(run_finetune(run_config(pretrained_dir, demo_dir, tmp_path / name)) / "model.safetensors")
               for name in ("a", "b")]
    assert "classifier.weight" in weights[0]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_two_accumulated_batches_of_4_train_like_one_batch_of_8(tokenizer, demo_dir: Path) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    models = [tiny_bert(tokenizer) for _ in range(2)]  # no dropout: the passes see the same network
    for model, batch_size, passes in zip(models, (8, 4), (1, 2)):
        finetune(model, tokenizer, TASK, data, dataclasses.replace(RECIPE, batch_size=batch_size, max_steps=6,
                                                                   gradient_accumulation_steps=passes), device="cpu")
    start = tiny_bert(tokenizer).state_dict()
    moved = 0
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[name], value, rtol=1e-4, atol=1e-5)
        moved += not torch.equal(value, start[name])
    assert moved > 10  # training changed the weights


def test_epochs_count_optimizer_steps_of_the_accumulated_batch(tokenizer, demo_dir: Path) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    with Progress(disable=True) as progress:
        finetune(tiny_bert(tokenizer), tokenizer, TASK, data,
                 dataclasses.replace(RECIPE, epochs=1, batch_size=16, gradient_accumulation_steps=4),
                 device="cpu", progress=progress)
        assert progress.tasks[0].total == 256 // (16 * 4)


def test_running_out_of_gpu_memory_is_a_user_error_naming_the_knobs(tokenizer, demo_dir: Path, monkeypatch) -> None:
    data = load_task_data(TASK, data_dir=str(demo_dir))
    model = tiny_bert(tokenizer)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "forward", out_of_memory)
    with pytest.raises(UserError) as caught:
        finetune(model, tokenizer, TASK, data, dataclasses.replace(RECIPE, max_steps=2), device="cpu")
    message = str(caught.value)
    assert "batch_size=16" in message and "gradient_accumulation_steps=2" in message and "\n" not in message
