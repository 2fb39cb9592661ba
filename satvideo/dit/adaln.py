"""Expert adaptive LayerNorm: text and video tokens share attention and MLP weights but get their own
shift/scale/gate modulation from the timestep embedding; optional LayerNorm of queries and keys per head."""

from __future__ import annotations

from typing import Callable

import torch
from sat.model.base_model import BaseMixin, non_conflict
from sat.ops.layernorm import LayerNorm
from torch import nn

from satvideo.dit.embeddings import modulate

Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate; each [B, D]


def expert_residual(norm: nn.Module, sublayer: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor,
                    video: torch.Tensor, text_mod: Modulation, video_mod: Modulation) -> tuple[torch.Tensor, torch.Tensor]:
    """x + gate * sublayer(modulate(norm(x))), with one modulation for text tokens and another for video tokens."""
    (text_shift, text_scale, text_gate), (video_shift, video_scale, video_gate) = text_mod, video_mod
    inputs = torch.cat([modulate(norm(text), text_shift, text_scale), modulate(norm(video), video_shift, video_scale)], 1)
    outputs = sublayer(inputs)
    text_length = text.shape[1]
    return (text + text_gate.unsqueeze(1) * outputs[:, :text_length],
            video + video_gate.unsqueeze(1) * outputs[:, text_length:])


class AdaLNMixin(BaseMixin):
    """Per layer, a SiLU+Linear maps the timestep embedding to 12 chunks: video (shift, scale, gate) for
    attention, video (shift, scale, gate) for the MLP, then the same six for text."""

    def __init__(self, hidden_size: int, num_layers: int, time_embed_dim: int, qk_ln: bool = True,
                 hidden_size_head: int | None = None, elementwise_affine: bool = True):
        super().__init__()
        self.adaLN_modulations = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 12 * hidden_size)) for _ in range(num_layers)])
        self.qk_ln = qk_ln
        if qk_ln:
            def head_norms() -> nn.ModuleList:
                return nn.ModuleList([LayerNorm(hidden_size_head, eps=1e-6, elementwise_affine=elementwise_affine)
                                      for _ in range(num_layers)])
            self.query_layernorm_list = head_norms()
            self.key_layernorm_list = head_norms()

    def layer_forward(self, hidden_states, mask, *args, **kwargs):
        layer_id, text_length = kwargs["layer_id"], kwargs["text_length"]
        layer = self.transformer.layers[layer_id]
        chunks = self.adaLN_modulations[layer_id](kwargs["emb"]).chunk(12, dim=1)
        video_attn, video_mlp, text_attn, text_mlp = chunks[0:3], chunks[3:6], chunks[6:9], chunks[9:12]
        text, video = hidden_states[:, :text_length], hidden_states[:, text_length:]

        text, video = expert_residual(layer.input_layernorm, lambda x: layer.attention(x, mask, **kwargs),
                                      text, video, text_attn, video_attn)
        text, video = expert_residual(layer.post_attention_layernorm, lambda x: layer.mlp(x, **kwargs),
                                      text, video, text_mlp, video_mlp)
        return torch.cat([text, video], dim=1)

    @non_conflict
    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None,
                     log_attention_weights=None, scaling_attention_score=True, old_impl=None, **kwargs):
        if self.qk_ln:
            layer_id = kwargs["layer_id"]
            query_layer = self.query_layernorm_list[layer_id](query_layer)
            key_layer = self.key_layernorm_list[layer_id](key_layer)
        return old_impl(query_layer, key_layer, value_layer, attention_mask, attention_dropout=attention_dropout,
                        log_attention_weights=log_attention_weights, scaling_attention_score=scaling_attention_score,
                        **kwargs)

    def reinit(self, parent_model=None):
        # Zero modulation: every block starts as the identity (the adaLN-Zero initialisation of DiT).
        for modulation in self.adaLN_modulations:
            nn.init.zeros_(modulation[-1].weight)
            nn.init.zeros_(modulation[-1].bias)
