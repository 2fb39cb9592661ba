"""Text conditioning: frozen T5 encoders and the conditioner that applies classifier-free-guidance dropout."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from satvideo.config import ConfigError, instantiate_from_config, unknown_key_error


class T5TextEncoder(nn.Module):
    """Tokenizer + frozen T5 encoder: list of prompts -> [B, max_length, d_model] features."""

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="pt")
        device = next(self.encoder.parameters()).device
        return self.encoder(input_ids=tokens.input_ids.to(device)).last_hidden_state


class FrozenT5Embedder(T5TextEncoder):
    """T5 (e.g. T5-v1.1-XXL, 4096-d) from a local transformers directory; never downloads."""

    def __init__(self, model_dir: str, max_length: int = 226, cache_dir: str | None = None, freeze: bool = True):
        from transformers import AutoTokenizer, T5EncoderModel

        if not Path(model_dir).is_dir():
            raise ConfigError(
                f"FrozenT5Embedder params.model_dir={model_dir!r} is not a directory; point it "
                "at a local T5 encoder (transformers layout: config.json, *.safetensors, tokenizer files)")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(model_dir, local_files_only=True)
        super().__init__(tokenizer, encoder, max_length)


class TinyT5Embedder(T5TextEncoder):
    """A small randomly initialised T5 encoder with a byte-level tokenizer, for tiny configs: needs no files.

    Initialised from `seed` under a private RNG, so every process (training ranks, the sampler) builds the
    same encoder and checkpoints need not store it.
    """

    def __init__(self, max_length: int = 32, d_model: int = 32, num_layers: int = 1, num_heads: int = 2,
                 d_ff: int = 64, seed: int = 0):
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        tokenizer = ByT5Tokenizer()
        config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                          num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = T5EncoderModel(config)
        super().__init__(tokenizer, encoder, max_length)


def caption_tokenizer(conditioner_config: dict) -> tuple[object, int] | None:
    """(tokenizer, max_length) of the first T5 embedder of a conditioner config, loading no encoder weights;
    None when it has none."""
    for config in conditioner_config.get("params", {}).get("emb_models", []):
        target, params = config.get("target", ""), dict(config.get("params") or {})
        if target.endswith("TinyT5Embedder"):
            from transformers import ByT5Tokenizer

            return ByT5Tokenizer(), params.get("max_length", 32)
        if target.endswith("FrozenT5Embedder"):
            from transformers import AutoTokenizer

            if not Path(params.get("model_dir", "")).is_dir():
                raise ConfigError(f"{target} params.model_dir={params.get('model_dir')!r} is not a directory")
            return AutoTokenizer.from_pretrained(params["model_dir"], local_files_only=True), params.get("max_length", 226)
    return None


CACHED_FEATURES = "text_features"  # batch key of precomputed features [B, L, D]
EMBEDDER_KEYS = ("target", "params", "is_trainable", "input_key", "ucg_rate")  # an `emb_models` entry


def drop_captions(parts: list[torch.Tensor], ucg_rates: list[float]) -> list[torch.Tensor]:
    """Each embedder's features [B, L, D] with every sample zeroed with probability `ucg_rate` (CFG dropout)."""
    dropped = []
    for emb, ucg_rate in zip(parts, ucg_rates):
        if ucg_rate > 0:
            keep = torch.bernoulli(torch.full((emb.shape[0],), 1.0 - ucg_rate, device=emb.device))
            emb = emb * keep[:, None, None].to(emb.dtype)
        dropped.append(emb)
    return dropped


class GeneralConditioner(nn.Module):
    """Runs each embedder on its batch key and concatenates the features into `{"crossattn": [B, L, D]}`.

    In training each sample's features are zeroed with probability `ucg_rate` (classifier-free-guidance
    dropout); the unconditional input used in sampling is the same all-zero features.
    """

    def __init__(self, emb_models: list[dict]):
        super().__init__()
        self.embedders = nn.ModuleList()
        self.input_keys: list[str] = []
        self.ucg_rates: list[float] = []
        for index, config in enumerate(emb_models):
            for key in config:
                if key not in EMBEDDER_KEYS:
                    raise unknown_key_error(key, f"model.conditioner_config.params.emb_models[{index}]", EMBEDDER_KEYS)
            if config.get("is_trainable", False):
                raise ConfigError(f"conditioner_config.params.emb_models[{index}].is_trainable: trainable text "
                                  "encoders are not supported; the conditioner is frozen")
            try:
                self.embedders.append(instantiate_from_config({"target": config["target"],
                                                               "params": config.get("params")}))
            except ConfigError as error:
                raise ConfigError(f"model.conditioner_config.params.emb_models[{index}]: {error}") from error
            self.input_keys.append(config.get("input_key", "txt"))
            self.ucg_rates.append(float(config.get("ucg_rate", 0.0)))
        self.requires_grad_(False)

    def forward(self, batch: dict, drop_for_guidance: bool = False) -> dict[str, torch.Tensor]:
        """Features of a batch, from its texts or from `text_features` cached by satvideo.data.cache."""
        if CACHED_FEATURES in batch:
            widths = [embedder.encoder.config.d_model for embedder in self.embedders]
            parts = list(batch[CACHED_FEATURES].split(widths, dim=-1))
        else:
            parts = [embedder(batch[key]) for embedder, key in zip(self.embedders, self.input_keys)]
        if drop_for_guidance:
            parts = drop_captions(parts, self.ucg_rates)
        return {"crossattn": torch.cat(parts, dim=-1)}

    @staticmethod
    def unconditional(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.zeros_like(value) for key, value in cond.items()}


class CachedTextConditioner(nn.Module):
    """The conditioner of a run that trains from a cache: the cached features [B, L, sum(widths)] of each embedder
    of `model.conditioner_config`, with the caption dropout of GeneralConditioner (the same draws, embedder by
    embedder), and no text encoder."""

    def __init__(self, widths: list[int], ucg_rates: list[float]):
        super().__init__()
        self.widths, self.ucg_rates = list(widths), list(ucg_rates)

    def forward(self, batch: dict, drop_for_guidance: bool = False) -> dict[str, torch.Tensor]:
        if CACHED_FEATURES not in batch:
            raise ValueError("this engine was built to train from a cache: it has no text encoder for the batch's texts")
        parts = list(batch[CACHED_FEATURES].split(self.widths, dim=-1))
        if drop_for_guidance:
            parts = drop_captions(parts, self.ucg_rates)
        return {"crossattn": torch.cat(parts, dim=-1)}
