"""XLM-RoBERTa: its layout (position ids start after the padding id) and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned XLM-RoBERTa checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.xlm_roberta import modeling_xlm_roberta

from .kprune_common import encoder_layer_layout, pruned_classes

LAYOUT = encoder_layer_layout(
    modeling_xlm_roberta.XLMRobertaModel, modeling_xlm_roberta.XLMRobertaForSequenceClassification,
    modeling_xlm_roberta.XLMRobertaForQuestionAnswering, positions_after_padding=True,
)


XLMRobertaModel, XLMRobertaForSequenceClassification, XLMRobertaForQuestionAnswering = pruned_classes(LAYOUT, __name__)
