"""The diffusion transformer and its mixins."""

from satvideo.dit.adaln import AdaLNMixin
from satvideo.dit.final_layer import FinalLayerMixin
from satvideo.dit.patch_embed import PatchEmbedMixin
from satvideo.dit.positions import Rotary3DPositionMixin, SinCos3DPositionMixin
from satvideo.dit.swiglu import SwiGLUMixin
from satvideo.dit.transformer import DiffusionTransformer

__all__ = ["AdaLNMixin", "DiffusionTransformer", "FinalLayerMixin", "PatchEmbedMixin", "Rotary3DPositionMixin",
           "SinCos3DPositionMixin", "SwiGLUMixin"]
