"""DiffusionTransformer: CogVideoX's expert transformer as a SwissArmyTransformer BaseModel.

The core is SAT's plain pre-LayerNorm transformer over one sequence [text tokens; video tokens] with full
attention. Everything video-specific is a mixin chosen in the `modules` section of the config:

    pos_embed      SinCos3DPositionMixin | Rotary3DPositionMixin   (positions)
    patch_embed    PatchEmbedMixin                                 (latents and T5 features -> tokens)
    adaln_layer    AdaLNMixin                                      (expert adaptive LayerNorm, qk LayerNorm)
    final_layer    FinalLayerMixin                                 (tokens -> latent patches)
    swiglu         SwiGLUMixin                                     (use_SwiGLU: true)
    lora           sat.model.finetune.lora2.LoraMixin              (lora_config)

Parameter names equal those of the official SAT checkpoints (`mixins.<name>.*`, `transformer.layers.*`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from sat.model.base_model import BaseModel
from sat.model.transformer import BaseTransformer
from sat.ops.layernorm import LayerNorm, RMSNorm
from torch import nn
from torch.overrides import TorchFunctionMode

from satvideo.config import ConfigError, instantiate_from_config, unknown_key_error
from satvideo.distributed import init_distributed
from satvideo.dit.embeddings import embedding_mlp, timestep_embedding
from satvideo.dit.patch_embed import split_patch_size
from satvideo.dit.swiglu import SwiGLUMixin

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILED_GRAPHS_LIMIT = 64  # compiled graphs per function under `args.compile` (shapes x grad modes)

# Mixins in the order their hooks wrap each other: attention runs qk-LayerNorm (adaln_layer), then RoPE
# (pos_embed), then scaled_dot_product_attention (the model's own attention_fn).
MIXIN_ORDER = ("pos_embed", "patch_embed", "adaln_layer", "final_layer")


class _ForceMeta(TorchFunctionMode):
    """Sends tensors created with an explicit `device` to the meta device too. SAT's LoraMixin builds its layers
    on the CPU and copies the original weights into them, which a meta build could not otherwise do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def allocate_on(device: torch.device) -> contextlib.ExitStack:
    """A context in which new tensors default to `device`; on meta, every new tensor goes there."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.device(device))
    if device.type == "meta":
        stack.enter_context(_ForceMeta())
    return stack


# `transformer_args` keys of the official configs; vocab_size and is_decoder describe SAT's text models and are
# fixed here (1 and false).
TRANSFORMER_ARGS = ("checkpoint_activations", "checkpoint_num_layers", "max_sequence_length", "layernorm_order",
                    "skip_init", "model_parallel_size", "vocab_size", "is_decoder")


def _transformer_option(transformer_args: dict | argparse.Namespace | None, key: str, default: Any) -> Any:
    if transformer_args is None:
        return default
    if isinstance(transformer_args, dict):
        return transformer_args.get(key, default)
    return getattr(transformer_args, key, default)


def check_transformer_args(transformer_args: dict | argparse.Namespace | None) -> None:
    keys = vars(transformer_args) if isinstance(transformer_args, argparse.Namespace) else transformer_args or {}
    for key in keys:
        if key not in TRANSFORMER_ARGS:
            raise unknown_key_error(key, "model.network_config.params.transformer_args", TRANSFORMER_ARGS)


class DiffusionTransformer(BaseModel):
    def __init__(
        self,
        num_frames: int,
        time_compressed_rate: int,
        latent_width: int,
        latent_height: int,
        patch_size: int | list[int],
        in_channels: int,
        out_channels: int,
        hidden_size: int,
        num_layers: int,
        num_attention_heads: int,
        modules: dict,
        transformer_args: dict | argparse.Namespace | None = None,
        elementwise_affine: bool = True,
        time_embed_dim: int | None = None,
        ofs_embed_dim: int | None = None,
        default_ofs: float = 2.0,
        use_SwiGLU: bool = False,
        use_RMSNorm: bool = False,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        checkpoint_activations: bool | None = None,
        num_classes: int | None = None,
        input_time: str = "adaln",
    ):
        check_transformer_args(transformer_args)
        if num_classes is not None:
            raise ConfigError("model.network_config.params.num_classes: class-conditional models are not supported")
        if input_time != "adaln":
            raise ConfigError(f"model.network_config.params.input_time={input_time!r}: only 'adaln' is supported")
        if _transformer_option(transformer_args, "model_parallel_size", 1) != 1:
            raise ConfigError("transformer_args.model_parallel_size: only 1 is supported (use ZeRO for sharding)")
        if _transformer_option(transformer_args, "layernorm_order", "pre") != "pre":
            raise ConfigError("transformer_args.layernorm_order: only 'pre' is supported")
        if dtype not in DTYPES:
            raise ConfigError(f"model.network_config.params.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        if hidden_size % num_attention_heads:
            raise ConfigError(f"model.network_config.params.hidden_size={hidden_size} is not a multiple of "
                              f"num_attention_heads={num_attention_heads}")
        head_size = (modules.get("pos_embed_config", {}).get("params") or {}).get("hidden_size_head")
        if head_size is not None and head_size != hidden_size // num_attention_heads:
            raise ConfigError(f"model.network_config.params.modules.pos_embed_config.params.hidden_size_head="
                              f"{head_size}: the heads are {hidden_size // num_attention_heads} wide (hidden_size "
                              f"{hidden_size} / num_attention_heads {num_attention_heads})")
        if checkpoint_activations is None:
            checkpoint_activations = _transformer_option(transformer_args, "checkpoint_activations", False)
        device = torch.device(device)
        init_distributed()  # SAT's parallel layers query the model-parallel group while being built

        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.time_embed_dim = time_embed_dim or hidden_size
        self.ofs_embed_dim = ofs_embed_dim
        self.default_ofs = default_ofs
        self.patch_t, self.patch = split_patch_size(patch_size)
        # SAT hands `layernorm_epsilon` (1e-5, as in the official model) to every block and final LayerNorm.
        layernorm = RMSNorm if use_RMSNorm else partial(LayerNorm, elementwise_affine=elementwise_affine)
        activation = F.silu if use_SwiGLU else nn.GELU(approximate="tanh")
        with allocate_on(device):  # SAT passes `device` to its linears but not to its LayerNorms
            transformer = BaseTransformer(
                num_layers=num_layers,
                vocab_size=1,  # SAT always builds a word embedding; PatchEmbedMixin removes it
                hidden_size=hidden_size,
                num_attention_heads=num_attention_heads,
                layernorm_epsilon=1e-5,
                max_sequence_length=_transformer_option(transformer_args, "max_sequence_length", 64),
                checkpoint_activations=checkpoint_activations,
                checkpoint_num_layers=_transformer_option(transformer_args, "checkpoint_num_layers", 1),
                layernorm=layernorm,
                activation_func=activation,
                skip_init=device.type == "meta" or _transformer_option(transformer_args, "skip_init", False),
                device=device,
            )
        super().__init__(args=None, transformer=transformer)

        with allocate_on(device):
            self.time_embed = embedding_mlp(hidden_size, self.time_embed_dim)
            self.ofs_embed = embedding_mlp(ofs_embed_dim, self.time_embed_dim) if ofs_embed_dim else None
            self._add_mixins(modules, num_frames, time_compressed_rate, latent_width, latent_height, patch_size,
                             in_channels, out_channels, num_attention_heads, elementwise_affine, use_SwiGLU)
        if DTYPES[dtype] != torch.float32:
            self.to(DTYPES[dtype])

    def _add_mixins(self, modules: dict, num_frames: int, time_compressed_rate: int, latent_width: int,
                    latent_height: int, patch_size: int | list[int], in_channels: int, out_channels: int,
                    num_attention_heads: int, elementwise_affine: bool, use_SwiGLU: bool) -> None:
        for name in MIXIN_ORDER:
            if f"{name}_config" not in modules:
                raise ConfigError(f"model.network_config.params.modules.{name}_config is missing")
        grid = dict(height=latent_height // self.patch, width=latent_width // self.patch,
                    compressed_num_frames=(num_frames - 1) // time_compressed_rate + 1)
        shared = dict(hidden_size=self.hidden_size)
        extra_args = {
            "pos_embed": {**grid, **shared},
            "patch_embed": dict(patch_size=patch_size, in_channels=in_channels, **shared),
            "adaln_layer": dict(**shared, num_layers=self.num_layers, time_embed_dim=self.time_embed_dim,
                                hidden_size_head=self.hidden_size // num_attention_heads,
                                elementwise_affine=elementwise_affine),
            "final_layer": dict(**shared, patch_size=patch_size, out_channels=out_channels,
                                time_embed_dim=self.time_embed_dim, elementwise_affine=elementwise_affine),
        }
        for name in MIXIN_ORDER:
            self.add_mixin(name, instantiate_from_config(modules[f"{name}_config"], **extra_args[name]), reinit=True)
        if use_SwiGLU:
            self.add_mixin("swiglu", SwiGLUMixin(self.num_layers, self.hidden_size, 4 * self.hidden_size))
        if "lora_config" in modules:
            self.add_mixin("lora", instantiate_from_config(modules["lora_config"], layer_num=self.num_layers),
                           reinit=True)

    def compile_layers(self) -> None:
        """Regional torch.compile (`args.compile`): each mixin with a `compile_regions` method compiles the
        element-wise parts of the layer it shapes; matmuls and attention stay the library kernels. The same
        compiled code serves every layer, so compile time does not grow with depth; parameter names do not change."""
        # Static shapes: each token grid, batch size and grad mode compiles its own graph. Past dynamo's limit of
        # graphs per function (8 by default) the rest would run eager without a word, and shape buckets with their
        # validation passes reach 8 easily.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_LIMIT)
        for mixin in self.mixins.values():
            if hasattr(mixin, "compile_regions"):
                mixin.compile_regions()

    def attention_fn(self, query_layer, key_layer, value_layer, attention_mask, attention_dropout=None, **kwargs):
        """Full attention over [text; video]: [B, heads, N, head_dim] -> same. Flash/memory-efficient kernels on GPU."""
        dropout_p = attention_dropout.p if attention_dropout is not None and self.training else 0.0
        return F.scaled_dot_product_attention(query_layer, key_layer, value_layer, dropout_p=dropout_p)

    def embed_conditions(self, timesteps: torch.Tensor, ofs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """[B] timestep indices (and [B] ofs for 1.5-I2V) -> [B, time_embed_dim] modulation input."""
        emb = self.time_embed(timestep_embedding(timesteps, self.hidden_size).to(dtype))
        if self.ofs_embed is not None:
            if ofs is None:
                ofs = torch.full_like(timesteps, self.default_ofs, dtype=torch.float32)
            emb = emb + self.ofs_embed(timestep_embedding(ofs, self.ofs_embed_dim).to(dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                concat_images: torch.Tensor | None = None, ofs: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x [B, T, C, H, W] latents, timesteps [B], context [B, L, text_dim] -> [B, T, C_out, H, W].

        `concat_images` [B or B/2, T, C', H, W] (image-to-video) is concatenated on channels; a half batch is
        repeated for the classifier-free-guidance batch.
        """
        dtype = self.time_embed[0].weight.dtype
        if concat_images is not None:
            if concat_images.shape[0] != x.shape[0]:
                concat_images = concat_images.repeat(x.shape[0] // concat_images.shape[0], 1, 1, 1, 1)
            x = torch.cat([x, concat_images], dim=2)
        x, context = x.to(dtype), context.to(dtype)
        _, frames, _, height, width = x.shape
        if frames % self.patch_t or height % self.patch or width % self.patch:
            raise ValueError(f"latent shape {tuple(x.shape)} is not divisible by the patch size "
                             f"({self.patch_t}, {self.patch}, {self.patch})")
        grid = (frames // self.patch_t, height // self.patch, width // self.patch)
        kwargs.update(images=x, emb=self.embed_conditions(timesteps, ofs, dtype), encoder_outputs=context,
                      text_length=context.shape[1], grid_size=grid, seq_length=math.prod(grid))
        placeholder = torch.ones(1, 1, device=x.device, dtype=dtype)  # SAT's token-id inputs are unused here
        return super().forward(input_ids=placeholder, position_ids=placeholder, attention_mask=placeholder, **kwargs)[0]
