"""The families beyond the BERT layout and DistilBERT, on tiny random models built from configs:
physical pruning computes what masks compute, emptied sub-layers are their residual path,
checkpoints reload with stock transformers, ``kprune run`` completes, FLOPs follow the structure."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import OTHER_FAMILIES, WORDS, kprune, make_char_tokenizer, make_tiny_model, write_mrpc_data
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from kprune_cli.models.adapters import check_supported, get_adapter
from kprune_cli.models.checkpoint import save_pruned
from kprune_cli.models.loading import count_parameters, load_model
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.models.slicing import prune_physically
from kprune_cli.pruners.common.hooks import capture_taps, forward_until
from kprune_cli.pruners.common.teacher import Teacher
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import get_task

HEADS = ("classification", "qa")


def head_weights(family: str, d: int, d_h: int) -> int:
    """Parameters one head owns: its rows (weights and biases) of every projection that is split by
    heads, and its ``d_h`` columns of the attention output projection."""
    if family == "modernbert":  # a fused QKV projection and no biases
        return 3 * d * d_h + d * d_h
    return {"xlm-roberta": 3, "mpnet": 3, "deberta-v2": 3}[family] * (d * d_h + d_h) + d * d_h


def neuron_weights(family: str, d: int) -> int:
    """Parameters one FFN neuron owns: its input row(s) with bias, its output column."""
    if family == "modernbert":  # a value and a gate row, no biases
        return 3 * d
    return {"xlm-roberta": 2 * d + 1, "mpnet": 2 * d + 1, "deberta-v2": 2 * d + 1}[family]


def family_masks(adapter, seed: int = 0) -> Masks:
    """Random 0/1 masks with real-valued survivors, the attention of layer 0 and the FFN of layer 1 emptied."""
    generator = torch.Generator().manual_seed(seed)
    masks = Masks.ones(adapter)
    for mask in masks.heads + masks.neurons:
        mask.copy_((torch.rand(mask.shape, generator=generator) > 0.4).float())
        mask[0], mask[1] = 0.0, 1.0
        mask.mul_(0.5 + torch.rand(mask.shape, generator=generator))
    masks.heads[0].zero_()
    masks.neurons[1].zero_()
    return masks


def outputs(model, inputs) -> torch.Tensor:
    """The last hidden states and the task outputs of ``model``, flattened into one vector."""
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True)
    task = result.logits if "logits" in result else torch.stack([result.start_logits, result.end_logits], dim=-1)
    return torch.cat([result.hidden_states[-1].flatten(), task.flatten()])


def pruned_copy(model):
    adapter = get_adapter(model)
    masks = family_masks(adapter)
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), masks)
    return pruned, masks


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_pruned_copy_matches_masked_model(family, head, tiny_inputs):
    model = make_tiny_model(family, head)
    adapter = get_adapter(model)
    masks = family_masks(adapter)
    dense = outputs(model, tiny_inputs)
    with apply_masks(adapter, masks):
        masked = outputs(model, tiny_inputs)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the masks do change the model

    pruned, _ = pruned_copy(model)

    torch.testing.assert_close(outputs(pruned, tiny_inputs), masked, atol=1e-4, rtol=0)
    assert get_adapter(pruned).structure() == masks.kept()
    d, d_h = adapter.hidden_size, adapter.head_size
    heads = sum(int((m == 0).sum()) for m in masks.heads)
    neurons = sum(int((m == 0).sum()) for m in masks.neurons)
    removed = heads * head_weights(family, d, d_h) + neurons * neuron_weights(family, d)
    assert count_parameters(pruned) == count_parameters(model) - removed


def bias(linear) -> torch.Tensor | float:
    return linear.bias if linear.bias is not None else 0.0


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_an_emptied_sub_layer_is_its_residual_path(family, tiny_inputs):
    """Layer 0 keeps no heads, layer 1 no neurons: what leaves each emptied sub-layer is what
    entered it plus the output projection's bias, then the LayerNorm after it (post-LN) or nothing
    (pre-norm: the sum is the next sub-layer's LayerNorm input, or the layer's output)."""
    pruned, _ = pruned_copy(make_tiny_model(family))
    adapter = get_adapter(pruned)
    attention, ffn = adapter.layers()[0], adapter.layers()[1]
    seen = {}

    def record(name, output=False):
        def hook(module, args, result=None):
            seen[name] = (result[0] if isinstance(result, tuple) else result) if output else args[0]
        return hook

    if adapter.layout.pre_norm:
        taps = [(attention.layer, "mha in", False), (attention.ffn_norm, "mha out", False),
                (ffn.ffn_norm, "ffn in", False), (ffn.layer, "ffn out", True)]
    else:
        taps = [(attention.layer, "mha in", False), (attention.attn_norm, "mha out", True),
                (ffn.ffn_in, "ffn in", False), (ffn.ffn_norm, "ffn out", True)]
    hooks = [module.register_forward_hook(record(name, True)) if output
             else module.register_forward_pre_hook(record(name)) for module, name, output in taps]
    with torch.no_grad():
        pruned(**tiny_inputs)
        for hook in hooks:
            hook.remove()
        mha = seen["mha in"] + bias(attention.attn_out)
        ffn_out = seen["ffn in"] + bias(ffn.ffn_out)
        if not adapter.layout.pre_norm:
            mha, ffn_out = attention.attn_norm(mha), ffn.ffn_norm(ffn_out)
    assert attention.num_heads == 0 and ffn.num_neurons == 0
    torch.testing.assert_close(seen["mha out"], mha, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["ffn out"], ffn_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_checkpoint_reloads_with_stock_transformers(family, head, tiny_inputs, tmp_path):
    pruned, masks = pruned_copy(make_tiny_model(family, head))
    save_pruned(pruned, make_char_tokenizer(token_type_ids=False), tmp_path / "pruned")

    auto = AutoModelForQuestionAnswering if head == "qa" else AutoModelForSequenceClassification
    stock = auto.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    loaded, _ = load_model(str(tmp_path / "pruned"), get_task("squad" if head == "qa" else "mrpc"))
    expected = outputs(pruned, tiny_inputs)
    for reloaded in (stock, loaded):
        assert type(reloaded).__module__.endswith(".modeling_kprune")  # the pruned class
        assert get_adapter(reloaded).structure() == masks.kept()
        torch.testing.assert_close(outputs(reloaded, tiny_inputs), expected, atol=1e-5, rtol=0)


def write_squad_data(directory: Path, questions: int = 24) -> Path:
    """A tiny SQuAD v1.1 layout (train and dev files) of random word contexts, one answer word each."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        articles = []
        for article in range(questions // 4):
            qas, context = [], " ".join(rng.choice(WORDS) for _ in range(8))
            for number in range(4):
                answer = rng.choice(context.split())
                qas.append({"id": f"{name}-{article}-{number}", "question": f"which {rng.choice(WORDS)}",
                            "answers": [{"text": answer, "answer_start": context.index(answer)}]})
            articles.append({"title": f"a{article}", "paragraphs": [{"context": context, "qas": qas}]})
        (directory / name).write_text(json.dumps({"version": "1.1", "data": articles}))
    return directory


@pytest.mark.parametrize("pruner", ["kprune", "kwon"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_kprune_run_prunes_the_family(family, head, pruner, tmp_path):
    checkpoint = tmp_path / "model"
    make_tiny_model(family, head, max_positions=512).save_pretrained(checkpoint)
    make_char_tokenizer(token_type_ids=False).save_pretrained(checkpoint)
    if head == "qa":
        task, data = "squad", write_squad_data(tmp_path / "squad")
    else:
        task, data = "mrpc", write_mrpc_data(tmp_path / "mrpc")
    output = tmp_path / "out"
    assert kprune("run", f"task={task}", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
                  f"pruner={pruner}", "rate=0.5", "calibration.num_tokens=300", "calibration.batch_size=8",
                  "device=cpu") == 0

    report = json.loads((output / "report.json").read_text())
    assert report["flops"]["pruned"] <= 0.5 * report["flops"]["dense"] * (1 + 1e-9)
    assert report["params"]["pruned"] < report["params"]["dense"]
    config = AutoConfig.from_pretrained(report["checkpoint"]["path"], trust_remote_code=True)
    kept = [{"heads": layer["heads"], "neurons": layer["neurons"]} for layer in report["layers"]]
    assert config.model_type == family and config.kprune_structure == kept


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_flops_follow_the_family_structure(family):
    adapter = get_adapter(make_tiny_model(family))
    flops = adapter.flops(seq_len=10)
    d, d_h = 32, 8
    assert flops.head == 3 * 2 * d * d_h * 10 + 2 * 2 * 10 * 10 * d_h + 2 * d_h * 10 * d
    assert flops.neuron == (2 * 3 * 10 * d if family == "modernbert" else 2 * 2 * 10 * d)  # gated: 2 input rows
    assert flops.total(adapter.structure()) == 2 * (4 * flops.head + 64 * flops.neuron)


def family_sample(num: int = 16, seq: int = 12) -> CalibrationSample:
    """``num`` random right-padded sequences of 4..``seq`` tokens without segment ids, in batches of 8."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, seq + 1, (num,), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, 100, (num, seq), generator=generator) * attention_mask
    return CalibrationSample([{"input_ids": input_ids[start:start + 8], "attention_mask": attention_mask[start:start + 8]}
                              for start in range(0, num, 8)])


def test_pre_norm_residual_sums_are_the_residual_stream():
    """ModernBERT has no LayerNorm after a residual sum: the teacher's sums are the stream itself,
    the FFN LayerNorm's input after the MHA and the layer's output after the FFN."""
    model = make_tiny_model("modernbert")
    teacher = Teacher(model, "classification", family_sample(), 2.0, batch_size=None, device="cpu")
    layer = model.model.layers[1]
    seen = {}
    hooks = [layer.mlp_norm.register_forward_pre_hook(lambda module, args: seen.update(mha=args[0])),
             layer.register_forward_hook(lambda module, args, output: seen.update(ffn=output))]
    with torch.no_grad():
        for index, batch in enumerate(teacher.batches):
            model(**batch.inputs)
            attn_sum, ffn_sum = teacher.residual_sums(2)[index], teacher.residual_sums(3)[index]
            torch.testing.assert_close(attn_sum, seen["mha"][batch.token_mask])
            torch.testing.assert_close(ffn_sum, seen["ffn"][batch.token_mask])
            torch.testing.assert_close(ffn_sum, attn_sum + layer.mlp(layer.mlp_norm(attn_sum)))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_kpwt_reduces_the_reconstruction_error(family):
    model = make_tiny_model(family)
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", family_sample(), 2.0, batch_size=None, device="cpu")
    masks = family_masks(adapter).clone()
    for mask in masks.heads + masks.neurons:  # 0/1, every sub-layer keeps some units
        mask.copy_((mask != 0).float())
        mask[1] = 1.0
    for sublayer in range(4):
        kind = "mha" if sublayer % 2 == 0 else "ffn"
        tap = adapter.layers()[sublayer // 2].sum_tap(kind)

        def error() -> float:
            total = 0.0
            for batch, target in zip(teacher.batches, teacher.residual_sums(sublayer)):
                with torch.no_grad(), apply_masks(adapter, masks), capture_taps({"sum": tap}) as store:
                    forward_until(model, batch.inputs, tap)
                total += float((store["sum"][batch.token_mask] - target).pow(2).sum())
            return total

        before = error()
        assert kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(sublayer), sublayer).notes == []
        assert error() < 0.99 * before  # the least-squares refit of the survivors' columns


def test_deberta_position_projections_lose_the_rows_of_pruned_heads(tiny_inputs):
    """Without ``share_att_key`` DeBERTa projects relative positions with their own Q and K
    projections: a head owns its rows of those two as well."""
    model = make_tiny_model("deberta-v2", share_att_key=False)
    adapter = get_adapter(model)
    masks = family_masks(adapter)
    with apply_masks(adapter, masks):
        masked = outputs(model, tiny_inputs)
    pruned, _ = pruned_copy(model)
    torch.testing.assert_close(outputs(pruned, tiny_inputs), masked, atol=1e-4, rtol=0)
    attention = pruned.deberta.encoder.layer[1].attention.self
    assert attention.pos_key_proj.out_features == attention.pos_query_proj.out_features == 8 * int(
        (masks.heads[1] != 0).sum())
    heads = sum(int((m == 0).sum()) for m in masks.heads)
    neurons = sum(int((m == 0).sum()) for m in masks.neurons)
    assert count_parameters(pruned) == count_parameters(model) - heads * (5 * (32 * 8 + 8) + 32 * 8) - neurons * 65


def test_deberta_v2_with_a_convolution_gets_a_clear_error():
    with pytest.raises(UserError, match="unsupported deberta-v2 variant: its convolution"):
        check_supported(AutoConfig.for_model("deberta-v2", conv_kernel_size=3))


def test_the_unsupported_family_error_names_every_family():
    with pytest.raises(UserError) as error:
        check_supported(AutoConfig.for_model("gpt2"))
    message = str(error.value)
    assert "unsupported architecture 'gpt2'" in message and "\n" not in message
    for family in ("bert", "distilbert", *OTHER_FAMILIES):
        assert family in message
