"""ELECTRA (discriminator checkpoints): its layout and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned ELECTRA checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers.models.electra import modeling_electra

from .kprune_common import encoder_layer_layout, pruned_classes

LAYOUT = encoder_layer_layout(modeling_electra.ElectraModel, modeling_electra.ElectraForSequenceClassification,
                              modeling_electra.ElectraForQuestionAnswering)


ElectraModel, ElectraForSequenceClassification, ElectraForQuestionAnswering = pruned_classes(LAYOUT, __name__)
