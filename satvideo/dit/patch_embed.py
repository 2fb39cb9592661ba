"""Video patches and T5 text features projected into one token sequence: [text; video]."""

from __future__ import annotations

import torch
from einops import rearrange
from sat.model.base_model import BaseMixin
from torch import nn


def split_patch_size(patch_size: int | list[int]) -> tuple[int, int]:
    """`2` (1.0 models, spatial only) or `[t, h, w]` (1.5 models) -> (temporal, spatial) patch size."""
    if isinstance(patch_size, int):
        return 1, patch_size
    patch_t, patch_h, patch_w = patch_size
    if patch_h != patch_w:
        raise ValueError(f"patch_size {list(patch_size)}: height and width patches must be equal")
    return patch_t, patch_h


class PatchEmbedMixin(BaseMixin):
    """Replaces SAT's word embedding: text tokens first, then video patches in (t, h, w) order.

    A spatial patch size (CogVideoX 1.0) uses a strided Conv2d per frame; a [t, h, w] patch size (1.5) flattens
    each spatio-temporal patch and applies a Linear, the layouts of the official checkpoints.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int | list[int], bias: bool = True,
                 text_hidden_size: int | None = None):
        super().__init__()
        self.patch_t, self.patch = split_patch_size(patch_size)
        if isinstance(patch_size, int):
            self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=self.patch, stride=self.patch, bias=bias)
        else:
            self.proj = nn.Linear(in_channels * self.patch_t * self.patch**2, hidden_size, bias=bias)
        self.text_proj = nn.Linear(text_hidden_size, hidden_size) if text_hidden_size is not None else None

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] latents -> [B, T/pt * H/p * W/p, D] tokens."""
        if isinstance(self.proj, nn.Conv2d):
            batch = images.shape[0]
            tokens = self.proj(images.flatten(0, 1))  # [(B T), D, H/p, W/p]
            return rearrange(tokens, "(b t) d h w -> b (t h w) d", b=batch)
        patches = rearrange(images, "b (t o) c (h p) (w q) -> b (t h w) (c o p q)",
                            o=self.patch_t, p=self.patch, q=self.patch)
        return self.proj(patches)

    def word_embedding_forward(self, input_ids, **kwargs):
        tokens = self.patchify(kwargs["images"])
        if self.text_proj is not None:
            tokens = torch.cat([self.text_proj(kwargs["encoder_outputs"]), tokens], dim=1)
        return tokens

    def reinit(self, parent_model=None):
        weight = self.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        del self.transformer.word_embeddings  # video and text arrive as features, not token ids
