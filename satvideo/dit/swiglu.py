"""SwiGLU MLP: out = W_out(act(W_gate x) * W_in x), the gate weights living in this mixin."""

from __future__ import annotations

from sat.model.base_model import BaseMixin
from torch import nn


class SwiGLUMixin(BaseMixin):
    def __init__(self, num_layers: int, in_features: int, hidden_features: int, bias: bool = False):
        super().__init__()
        self.w2 = nn.ModuleList([nn.Linear(in_features, hidden_features, bias=bias) for _ in range(num_layers)])

    def mlp_forward(self, hidden_states, **kwargs):
        layer_id = kwargs["layer_id"]
        mlp = self.transformer.layers[layer_id].mlp
        gated = mlp.activation_func(self.w2[layer_id](hidden_states)) * mlp.dense_h_to_4h(hidden_states)
        return mlp.dense_4h_to_h(gated)
