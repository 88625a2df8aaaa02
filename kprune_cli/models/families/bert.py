"""BERT (and MiniLM, whose checkpoints are ``bert``): its layout and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned BERT checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.bert import modeling_bert

from .kprune_common import encoder_layer_layout, pruned_classes

LAYOUT = encoder_layer_layout(modeling_bert.BertModel, modeling_bert.BertForSequenceClassification,
                              modeling_bert.BertForQuestionAnswering)


BertModel, BertForSequenceClassification, BertForQuestionAnswering = pruned_classes(LAYOUT, __name__)
