"""Final adaptive LayerNorm and linear projection of the video tokens back to latent patches."""

from __future__ import annotations

from einops import rearrange
from sat.model.base_model import BaseMixin
from torch import nn

from satvideo.dit.embeddings import modulate
from satvideo.dit.patch_embed import split_patch_size


class FinalLayerMixin(BaseMixin):
    def __init__(self, hidden_size: int, time_embed_dim: int, patch_size: int | list[int], out_channels: int,
                 elementwise_affine: bool = True):
        super().__init__()
        self.patch_t, self.patch = split_patch_size(patch_size)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=elementwise_affine, eps=1e-6)
        self.linear = nn.Linear(hidden_size, self.patch_t * self.patch**2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 2 * hidden_size))

    def final_forward(self, logits, **kwargs):
        video = logits[:, kwargs["text_length"]:]
        shift, scale = self.adaLN_modulation(kwargs["emb"]).chunk(2, dim=1)
        patches = self.linear(modulate(self.norm_final(video), shift, scale))  # [B, (t h w), (c o p q)]
        t, h, w = kwargs["grid_size"]
        return rearrange(patches, "b (t h w) (c o p q) -> b (t o) c (h p) (w q)",
                         t=t, h=h, w=w, o=self.patch_t, p=self.patch, q=self.patch)

    def reinit(self, parent_model=None):
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
