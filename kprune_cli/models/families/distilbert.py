"""DistilBERT: its layout (the attention owns its output projection) and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned DistilBERT checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.distilbert import modeling_distilbert

from .kprune_common import Layout, pruned_classes

LAYOUT = Layout(
    layers="transformer.layer", attention="attention",
    head_projections=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    attn_out="attention.out_lin", attn_norm="sa_layer_norm",
    ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_norm="output_layer_norm",
    encoder_class=modeling_distilbert.DistilBertModel,
    task_classes=(modeling_distilbert.DistilBertForSequenceClassification,
                  modeling_distilbert.DistilBertForQuestionAnswering),
)

DistilBertModel, DistilBertForSequenceClassification, DistilBertForQuestionAnswering = pruned_classes(
    LAYOUT, __name__)
