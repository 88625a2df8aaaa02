"""MPNet: its layout, its attention after head pruning and its pruned classes.

Ships as ``modeling_kprune.py`` beside the weights of a pruned MPNet checkpoint, with
``kprune_common.py``; see that module for how the classes rebuild the pruned layers.
"""

from __future__ import annotations

import torch
from transformers.models.mpnet import modeling_mpnet

from .kprune_common import Layout, pruned_classes


class MPNetSelfAttentionKeptHeads(modeling_mpnet.MPNetSelfAttention):
    """MPNet's self-attention after head pruning. The encoder computes the relative-position bias
    once for all the stock heads, ``(batch, heads, q, k)``; this layer adds only the rows of the
    heads it kept, ``kept_heads`` ``(k,)`` (a buffer, saved with the weights)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, ...]:
        if position_bias is not None:
            position_bias = position_bias[:, self.kept_heads]  # (batch, k, q, k_len)
        return super().forward(hidden_states, attention_mask, position_bias, **kwargs)


LAYOUT = Layout(
    layers="encoder.layer", attention="attention.attn",
    head_projections=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
    attn_out="attention.attn.o", attn_norm="attention.LayerNorm",
    ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    encoder_class=modeling_mpnet.MPNetModel,
    task_classes=(modeling_mpnet.MPNetForSequenceClassification, modeling_mpnet.MPNetForQuestionAnswering),
    positions_after_padding=True, kept_heads_attention=MPNetSelfAttentionKeptHeads,
)

MPNetModel, MPNetForSequenceClassification, MPNetForQuestionAnswering = pruned_classes(LAYOUT, __name__)
