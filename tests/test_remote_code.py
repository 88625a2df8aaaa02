"""A pruned checkpoint loads wherever a stock one of its family does: it ships its family's module
alone (plus the shared one), loads as the bare encoder and through transformers' pipelines, carries
a model card, and its files are as readable as any; checkpoints of older kprune versions still load."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAMILIES, OTHER_FAMILIES, kprune, make_char_tokenizer, make_tiny_model
from transformers import AutoModel, AutoModelForSequenceClassification, pipeline
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from kprune_cli.core.report import model_card
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.checkpoint import save_pruned
from kprune_cli.models.families import COMMON_FILE, MODELING_FILE, SUPPORTED_FAMILIES, family_module
from kprune_cli.models.loading import load_model
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.models.model_card import ModelCard
from kprune_cli.models.slicing import prune_physically
from kprune_cli.runtime.output_dir import atomic_directory
from kprune_cli.tasks.spec import get_task

ALL_FAMILIES = (*FAMILIES, *OTHER_FAMILIES)
FAMILY_NAMES = {
    "bert": r"\bBert[A-Z]|\bmodeling_bert\b|\bmodels\.bert\b",
    "roberta": r"\bRoberta[A-Z]|\bmodeling_roberta\b|\bmodels\.roberta\b",
    "xlm-roberta": r"XLMRoberta|xlm_roberta",
    "electra": r"(?i)electra",
    "mpnet": r"(?i)mpnet",
    "deberta-v2": r"(?i)deberta",
    "modernbert": r"(?i)modernbert",
    "distilbert": r"(?i)distilbert",
}
"""How a family's classes and transformers module are named (its own words only: ``XLMRobertaModel``
is no RoBERTa name, ``DistilBertModel`` no BERT name)."""
TRANSFORMERS_MODULES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "xlm_roberta", "electra": "electra",
                        "mpnet": "mpnet", "deberta-v2": "deberta_v2", "modernbert": "modernbert",
                        "distilbert": "distilbert"}


def pruned_tiny(family: str, head: str = "classification", seed: int = 0) -> torch.nn.Module:
    """A tiny model of ``family`` with layer 0's head 1 and every third neuron of layer 1 removed."""
    model = make_tiny_model(family, head, seed=seed, max_positions=512)
    masks = Masks.ones(get_adapter(model))
    masks.heads[0][1] = 0
    masks.neurons[1][::3] = 0
    prune_physically(get_adapter(model), masks)
    return model


def saved(model, directory: Path) -> Path:
    save_pruned(model, make_char_tokenizer(token_type_ids=model.config.model_type == "bert"), directory)
    return directory


def tiny_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 60, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_every_family_is_the_layout_and_the_pruned_classes_of_its_own_module():
    assert set(SUPPORTED_FAMILIES) == set(ALL_FAMILIES) == set(FAMILY_NAMES)
    for family in SUPPORTED_FAMILIES:
        module = family_module(family)
        for stock in (module.LAYOUT.encoder_class, *module.LAYOUT.task_classes):
            pruned = getattr(module, stock.__name__)  # named like the stock class: pipelines check names
            assert pruned is not stock and issubclass(pruned, stock)
            assert pruned.__module__ == module.__name__ and pruned.kprune_layout is module.LAYOUT


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_checkpoint_ships_its_family_alone(family, tmp_path):
    directory = saved(pruned_tiny(family), tmp_path / "pruned")

    sources = {path.name: path for path in directory.glob("*.py")}
    assert set(sources) == {MODELING_FILE, COMMON_FILE}
    text = "\n".join(path.read_text() for path in sources.values())
    assert re.search(FAMILY_NAMES[family], text)  # the patterns do find a family's names
    for other, names in FAMILY_NAMES.items():
        if other != family:
            assert not re.search(names, text), f"the {family} checkpoint names {other}"
    assert get_relative_imports(sources[MODELING_FILE]) == [COMMON_FILE.removesuffix(".py")]
    assert get_relative_imports(sources[COMMON_FILE]) == []
    for path in sources.values():  # what transformers checks before it runs remote code
        assert set(get_imports(path)) <= {"__future__", "collections", "dataclasses", "typing", "torch",
                                          "transformers"}
    config = json.loads((directory / "config.json").read_text())
    encoder, task = family_module(family).LAYOUT.encoder_class, config["architectures"][0]
    assert config["auto_map"] == {"AutoModel": f"modeling_kprune.{encoder.__name__}",
                                  "AutoModelForSequenceClassification": f"modeling_kprune.{task}"}


STOCK_LOAD = """
import json, sys
blocked = sys.argv[2].split(",")
for name in blocked:
    sys.modules["transformers.models." + name] = None  # as if this transformers had no such family
sys.modules["kprune_cli"] = None  # and kprune were not installed
import importlib
for name in blocked + ["kprune_cli"]:
    try:
        importlib.import_module(name if name == "kprune_cli" else "transformers.models." + name)
    except ImportError:
        continue
    raise SystemExit(name + " is still importable")
import torch
from transformers import AutoModel, AutoModelForSequenceClassification
inputs = {key: torch.tensor(value) for key, value in json.loads(sys.argv[3]).items()}
task = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
encoder = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    print(json.dumps({"logits": task(**inputs).logits.tolist(),
                      "features": encoder(**inputs).last_hidden_state.tolist()}))
"""


@pytest.mark.slow
def test_stock_transformers_loads_a_pruned_bert_without_the_other_families_or_kprune(tmp_path):
    model = pruned_tiny("bert")
    directory = saved(model, tmp_path / "pruned")
    inputs = tiny_batch()
    others = ",".join(module for family, module in TRANSFORMERS_MODULES.items() if family != "bert")
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}

    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(directory), others,
                             json.dumps({key: value.tolist() for key, value in inputs.items()})],
                            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        logits, features = model(**inputs).logits, model.bert(**inputs).last_hidden_state
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(loaded["features"]), features, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["classification", "qa"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_auto_model_loads_the_pruned_encoder(family, head, tmp_path):
    model = pruned_tiny(family, head)
    directory = saved(model, tmp_path / "pruned")

    encoder = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()

    layout = family_module(family).LAYOUT
    assert type(encoder).__name__ == layout.encoder_class.__name__ and isinstance(encoder, layout.encoder_class)
    assert type(encoder).__module__.endswith(".modeling_kprune")
    inputs = tiny_batch()
    with torch.no_grad():
        expected = model.base_model(**inputs).last_hidden_state
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, expected, atol=1e-5, rtol=0)


@pytest.fixture
def pipeline_errors():
    """The error lines transformers' pipelines log (e.g. "... is not supported for text-classification")."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("transformers.pipelines.base")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_text_classification_pipeline_accepts_the_pruned_model(family, pipeline_errors, tmp_path):
    model = pruned_tiny(family, seed=3)
    directory = saved(model, tmp_path / "pruned")
    pairs = [{"text": "the cat sat", "text_pair": "a dog ran"}, {"text": "hello there", "text_pair": "bye now"}]

    classifier = pipeline("text-classification", model=str(directory), trust_remote_code=True, device="cpu")
    predictions = classifier(pairs, top_k=None)

    assert [record.getMessage() for record in pipeline_errors] == []
    assert type(classifier.model).__module__.endswith(".modeling_kprune")
    tokenizer = make_char_tokenizer(token_type_ids=family == "bert")
    for pair, scores in zip(pairs, predictions):
        with torch.no_grad():
            logits = model(**tokenizer(pair["text"], pair["text_pair"], return_tensors="pt")).logits[0]
        expected = {model.config.id2label[i]: p for i, p in enumerate(logits.softmax(-1).tolist())}
        assert {score["label"]: score["score"] for score in scores} == pytest.approx(expected, abs=1e-6)


def test_feature_extraction_pipeline_gives_the_pruned_encoders_features(tmp_path):
    model = pruned_tiny("bert", seed=4)
    directory = saved(model, tmp_path / "pruned")

    extractor = pipeline("feature-extraction", model=str(directory), trust_remote_code=True, device="cpu")
    features = torch.tensor(extractor("the cat sat"))[0]  # (tokens, hidden)

    inputs = make_char_tokenizer()("the cat sat", return_tensors="pt")
    with torch.no_grad():
        expected = model.bert(**inputs).last_hidden_state[0]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_question_answering_pipeline_accepts_the_pruned_model(pipeline_errors, tmp_path):
    from transformers.pipelines import SUPPORTED_TASKS

    if "question-answering" not in SUPPORTED_TASKS:
        pytest.skip("this transformers has no question-answering pipeline (removed in 5.x)")
    model = pruned_tiny("bert", "qa", seed=5)
    directory = saved(model, tmp_path / "pruned")
    answerer = pipeline("question-answering", model=str(directory), trust_remote_code=True, device="cpu")
    context = "the cat sat on a mat"
    answer = answerer(question="which cat", context=context)
    assert [record.getMessage() for record in pipeline_errors] == []
    assert type(answerer.model).__module__.endswith(".modeling_kprune")
    assert context[answer["start"]:answer["end"]] == answer["answer"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_follow_the_umask(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        directory = saved(pruned_tiny("bert"), tmp_path / "pruned")
        with atomic_directory(tmp_path / "other") as staging:
            private = staging / "private.bin"
            private.write_bytes(b"x")
            private.chmod(0o600)
    finally:
        os.umask(previous)
    files = [*directory.iterdir(), tmp_path / "other" / "private.bin"]
    assert "model.safetensors" in {path.name for path in files}
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {path.name: oct(mode) for path in files}


def card(**changes) -> ModelCard:
    values = dict(task="mrpc", pipeline_tag="text-classification", auto_class="AutoModelForSequenceClassification",
                  source="org/bert-mrpc", base_model="org/bert-mrpc",
                  pruner="kprune", rate=0.6, metric="accuracy", dense=0.8725, pruned=0.8603,
                  evaluated_on="validation split", flops_kept=0.3998, seq_len=53.24,
                  layers=[{"heads": 3, "neurons": 40}, {"heads": 0, "neurons": 7}],
                  dense_layers=[{"heads": 4, "neurons": 64}, {"heads": 4, "neurons": 64}],
                  command="kprune run task=mrpc rate=0.6")
    return ModelCard(**{**values, **changes})


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_model_card_has_hub_front_matter_and_says_what_was_done():
    text = card().render()

    assert front_matter(text) == {"base_model": "org/bert-mrpc", "library_name": "transformers",
                                  "pipeline_tag": "text-classification",
                                  "tags": ["kprune", "pruning", "structured-pruning", "mrpc"]}
    assert "| accuracy (validation split) | 0.8725 | 0.8603 |" in text
    assert "| 100% | 40.0% |" in text
    assert "| 0 | 3 / 4 | 40 / 64 |" in text and "| 1 | 0 / 4 | 7 / 64 |" in text
    assert "kprune run task=mrpc rate=0.6" in text and "trust_remote_code=True" in text
    qa = card(pipeline_tag="question-answering", auto_class="AutoModelForQuestionAnswering", base_model=None,
              pruner="kwon").render()
    assert front_matter(qa) == {"library_name": "transformers", "pipeline_tag": "question-answering",
                                "tags": ["kprune", "pruning", "structured-pruning", "kwon", "mrpc"]}
    assert "AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=True)" in qa


def test_kprune_run_writes_the_model_card(tiny_checkpoint, mrpc_dir, tmp_path):
    output = tmp_path / "out"
    args = ("run", "task=mrpc", f"model.path={tiny_checkpoint}", f"data_dir={mrpc_dir}", f"output_dir={output}",
            "rate=0.5", "calibration.num_tokens=300", "calibration.batch_size=8", "device=cpu")
    assert kprune(*args) == 0

    report = json.loads((output / "report.json").read_text())
    text = (output / "pruned" / "README.md").read_text()
    assert front_matter(text)["pipeline_tag"] == "text-classification"
    assert "base_model" not in front_matter(text)  # a local directory is no hub id
    metric = report["metric"]
    assert f"| {metric['name']} (validation split) | {metric['dense']:.4f} | {metric['pruned']:.4f} |" in text
    assert f"{report['flops']['pruned'] / report['flops']['dense']:.1%} |" in text
    for index, (layer, dense) in enumerate(zip(report["layers"], report["dense_layers"])):
        assert f"| {index} | {layer['heads']} / {dense['heads']} | {layer['neurons']} / {dense['neurons']} |" in text
    command = text.split("```bash\n")[1].split("\n```")[0].split()
    assert command[:2] == ["kprune", "run"] and sorted(command[2:]) == sorted(args[1:])
    assert f"`{tiny_checkpoint}` pruned with kprune" in text
    pruned = output / "pruned"
    assert report["checkpoint"]["bytes"] == sum(path.stat().st_size for path in pruned.iterdir())
    for source, base_model in (("org/bert-mrpc", "org/bert-mrpc"), ("builtin:minilm", None),
                               (str(tiny_checkpoint), None)):
        assert model_card(report, get_task("mrpc"), source, None).base_model == base_model


LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint" / "modeling_kprune.py"
"""The single modeling file kprune shipped in every checkpoint before families got a module each."""


def as_legacy_checkpoint(directory: Path) -> None:
    """Make ``directory`` what kprune wrote before: the legacy file, ``KPrune...`` class names in ``auto_map``."""
    (directory / COMMON_FILE).unlink()
    shutil.copyfile(LEGACY, directory / MODELING_FILE)
    config = json.loads((directory / "config.json").read_text())
    task_class = config["architectures"][0]
    config["architectures"] = [f"KPrune{task_class}"]
    auto = next(name for name in config["auto_map"] if name != "AutoModel")
    config["auto_map"] = {auto: f"modeling_kprune.KPrune{task_class}"}
    (directory / "config.json").write_text(json.dumps(config))


def test_kprune_loads_and_prunes_again_a_checkpoint_of_an_older_version(tmp_path, mrpc_dir, capsys):
    model = pruned_tiny("bert")
    directory = saved(model, tmp_path / "legacy")
    as_legacy_checkpoint(directory)

    loaded, _ = load_model(str(directory), get_task("mrpc"))
    assert type(loaded).__name__ == "KPruneBertForSequenceClassification"
    inputs = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    assert kprune("eval", f"checkpoint={directory}", "task=mrpc", f"data_dir={mrpc_dir}", "device=cpu") == 0
    assert "accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]

    adapter = get_adapter(loaded)
    masks = Masks.ones(adapter)
    masks.heads[1][0] = 0
    prune_physically(adapter, masks)
    again = saved(loaded, tmp_path / "again")
    assert {path.name for path in again.glob("*.py")} == {MODELING_FILE, COMMON_FILE}
    reloaded = AutoModelForSequenceClassification.from_pretrained(again, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, loaded(**inputs).logits, atol=1e-5, rtol=0)


def test_a_loaded_mpnet_checkpoint_prunes_again_with_the_heads_it_kept(tmp_path):
    """MPNet's layers share one relative-position bias for all stock heads; pruning a loaded
    checkpoint again must select from the heads it kept, not from the first ones."""
    model = make_tiny_model("mpnet")
    with torch.no_grad():
        model.mpnet.encoder.relative_attention_bias.weight.mul_(100.0)  # a bias that matters
    masks = Masks.ones(get_adapter(model))
    masks.heads[0][1] = 0
    prune_physically(get_adapter(model), masks)
    loaded, _ = load_model(str(saved(model, tmp_path / "once")), get_task("mrpc"))
    adapter = get_adapter(loaded)
    masks = Masks.ones(adapter)
    masks.heads[0][0] = 0
    inputs = tiny_batch()
    with torch.no_grad(), apply_masks(adapter, masks):
        masked = loaded(**inputs).logits

    prune_physically(adapter, masks)

    assert loaded.mpnet.encoder.layer[0].attention.attn.kept_heads.tolist() == [2, 3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, masked, atol=1e-5, rtol=0)
