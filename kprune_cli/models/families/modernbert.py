"""ModernBERT: its layout and its pruned classes.

Pre-norm (``attn_norm`` is an identity in layer 0), with a fused ``Wqkv`` (Q, K, V blocks of all
heads), a gated ``Wi`` (value rows, then gate rows) and, by default, no biases; its rotary positions
and alternating local/global attention need nothing from pruning.

Ships as ``modeling_kprune.py`` beside the weights of a pruned ModernBERT checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.modernbert import modeling_modernbert

from .kprune_common import Layout, pruned_classes

LAYOUT = Layout(
    layers="layers", attention="attn", head_projections=("attn.Wqkv",), qkv_blocks=3,
    attn_out="attn.Wo", attn_norm="attn_norm", ffn_in="mlp.Wi", ffn_blocks=2, ffn_out="mlp.Wo",
    ffn_norm="mlp_norm", pre_norm=True, encoder_class=modeling_modernbert.ModernBertModel,
    task_classes=(modeling_modernbert.ModernBertForSequenceClassification,
                  modeling_modernbert.ModernBertForQuestionAnswering),
)

ModernBertModel, ModernBertForSequenceClassification, ModernBertForQuestionAnswering = pruned_classes(
    LAYOUT, __name__)
