"""DeBERTa-v2 (and DeBERTa-v3, whose checkpoints are ``deberta-v2``): its layout and its pruned classes.

The relative-position projections (``pos_query_proj`` / ``pos_key_proj``, present unless
``share_att_key``) are split by heads like Q and K; with ``share_att_key`` the positions go through
Q and K themselves.

Ships as ``modeling_kprune.py`` beside the weights of a pruned DeBERTa-v2 checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.models.deberta_v2 import modeling_deberta_v2

from .kprune_common import encoder_layer_layout, pruned_classes


def unsupported(config: PretrainedConfig) -> str | None:
    """The optional convolution after the first layer (v2 xlarge/xxlarge) mixes the encoder's input
    into layer 0's output outside the layers, which passes that start at a later layer cannot
    reproduce."""
    if getattr(config, "conv_kernel_size", 0) > 0:
        return "its convolution after the first layer (conv_kernel_size > 0) is not supported"
    return None


LAYOUT = encoder_layer_layout(
    modeling_deberta_v2.DebertaV2Model, modeling_deberta_v2.DebertaV2ForSequenceClassification,
    modeling_deberta_v2.DebertaV2ForQuestionAnswering,
    head_projections=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                      "attention.self.pos_query_proj", "attention.self.pos_key_proj"),
    unsupported=unsupported,
)

DebertaV2Model, DebertaV2ForSequenceClassification, DebertaV2ForQuestionAnswering = pruned_classes(LAYOUT, __name__)
