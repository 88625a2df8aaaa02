"""RoBERTa: its layout (position ids start after the padding id) and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned RoBERTa checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.roberta import modeling_roberta

from .kprune_common import encoder_layer_layout, pruned_classes

LAYOUT = encoder_layer_layout(modeling_roberta.RobertaModel, modeling_roberta.RobertaForSequenceClassification,
                              modeling_roberta.RobertaForQuestionAnswering, positions_after_padding=True)


RobertaModel, RobertaForSequenceClassification, RobertaForQuestionAnswering = pruned_classes(LAYOUT, __name__)
