"""Expert adaptive LayerNorm: text and video tokens share attention and MLP weights but get their own
shift/scale/gate modulation from the timestep embedding; optional LayerNorm of queries and keys per head."""

from __future__ import annotations

import torch
from sat.model.base_model import BaseMixin, non_conflict
from sat.ops.layernorm import LayerNorm
from torch import nn

from satvideo.dit.embeddings import modulate

Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate; each [B, D]


def modulated_inputs(text: torch.Tensor, video: torch.Tensor, text_mod: Modulation,
                     video_mod: Modulation) -> torch.Tensor:
    """Normalised text [B, L, D] and video [B, N, D] tokens, each modulated by its own shift and scale -> [B, L + N, D]."""
    return torch.cat([modulate(text, text_mod[0], text_mod[1]), modulate(video, video_mod[0], video_mod[1])], 1)


def gated_residual(hidden: torch.Tensor, outputs: torch.Tensor, text_gate: torch.Tensor, video_gate: torch.Tensor,
                   text_length: int) -> torch.Tensor:
    """hidden + gate * outputs over [B, L + N, D], the first L (text) tokens gated by text_gate [B, D], the rest by
    video_gate. The gates scale the sublayer's fresh output in place, so no text/video concatenation is needed."""
    outputs[:, :text_length].mul_(text_gate.unsqueeze(1))
    outputs[:, text_length:].mul_(video_gate.unsqueeze(1))
    return hidden + outputs


def gated_residual_out_of_place(hidden: torch.Tensor, outputs: torch.Tensor, text_gate: torch.Tensor,
                                video_gate: torch.Tensor, text_length: int) -> torch.Tensor:
    """gated_residual without touching `outputs`: what is compiled (a compiled graph must not mutate an input
    that autograd saved; inside the graph the copy fuses away)."""
    return gated_residual(hidden, outputs.clone(), text_gate, video_gate, text_length)


class AdaLNMixin(BaseMixin):
    """Per layer, a SiLU+Linear maps the timestep embedding to 12 chunks: video (shift, scale, gate) for
    attention, video (shift, scale, gate) for the MLP, then the same six for text."""

    def __init__(self, hidden_size: int, num_layers: int, time_embed_dim: int, qk_ln: bool = True,
                 hidden_size_head: int | None = None, elementwise_affine: bool = True):
        super().__init__()
        self.modulated_inputs, self.gated_residual = modulated_inputs, gated_residual  # compile_regions fuses them
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
        # hidden_states [B, L + N, D]: text tokens, then video tokens. LayerNorm is per token: one call for both.
        normed = layer.input_layernorm(hidden_states)
        inputs = self.modulated_inputs(normed[:, :text_length], normed[:, text_length:], text_attn, video_attn)
        hidden = self.gated_residual(hidden_states, layer.attention(inputs, mask, **kwargs), text_attn[2],
                                     video_attn[2], text_length)

        normed = layer.post_attention_layernorm(hidden)
        inputs = self.modulated_inputs(normed[:, :text_length], normed[:, text_length:], text_mlp, video_mlp)
        return self.gated_residual(hidden, layer.mlp(inputs, **kwargs), text_mlp[2], video_mlp[2], text_length)

    def compile_regions(self) -> None:
        """`args.compile`: the element-wise work around attention and MLP (modulation, gates, residuals) as fused
        kernels; the same compiled code serves every layer (static shapes: one graph per token grid)."""
        self.modulated_inputs = torch.compile(modulated_inputs, dynamic=False)
        self.gated_residual = torch.compile(gated_residual_out_of_place, dynamic=False)

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
