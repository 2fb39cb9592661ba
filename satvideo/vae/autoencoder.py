"""The video autoencoder: encoder, Gaussian posterior, decoder, and loading of `3d-vae.pt`."""
from pathlib import Path

import torch
from torch import Tensor, nn

from satvideo.checkpoint import safe_load, state_dict_in, tensors_only
from satvideo.config import CheckpointNotFound, ConfigError, instantiate_from_config, is_whole_number
from satvideo.vae.causal_conv import stream_over_time
from satvideo.vae.regularizer import DiagonalGaussianRegularizer

# Latent chunks after the first are even: the temporal upsampling would take a lone frame for the causal first frame.
LATENT_CHUNK_MULTIPLE = 2


def load_vae_state_dict(ckpt_path: str, ignore_keys: list[str] = ()) -> dict[str, Tensor]:
    """Read a `3d-vae.pt` (`{"state_dict": ...}` or a plain state dict), dropping keys under `ignore_keys`."""
    if not Path(ckpt_path).is_file():
        raise CheckpointNotFound(f"VAE checkpoint {ckpt_path} not found (config key `ckpt_path`)")
    state_dict = state_dict_in(safe_load(ckpt_path), "state_dict", ckpt_path)
    return tensors_only({key: value for key, value in state_dict.items() if not key.startswith(tuple(ignore_keys))},
                        ckpt_path)


class VideoAutoencoder(nn.Module):
    """CogVideoX 3D causal VAE: [B, 3, 4k+1, H, W] in [-1, 1] <-> latents [B, z_channels, k+1, H/8, W/8].

    Latents are unscaled: the engine applies `model.scale_factor`. Official params without effect here are
    listed in `satvideo.config.OFFICIAL_KEYS_WITHOUT_EFFECT`.
    """

    def __init__(self, encoder_config: dict, decoder_config: dict, regularizer_config: dict | None = None,
                 ckpt_path: str | None = None, ignore_keys: list[str] = ()):
        super().__init__()
        self.encoder = instantiate_from_config(encoder_config)
        self.decoder = instantiate_from_config(decoder_config)
        self.regularization = (
            DiagonalGaussianRegularizer() if regularizer_config is None else instantiate_from_config(regularizer_config)
        )
        if ckpt_path is not None:
            self.load_state_dict(load_vae_state_dict(ckpt_path, ignore_keys))

    def encode(self, x: Tensor, sample: bool | None = None, chunk_frames: int | None = None) -> Tensor:
        """Video [B, 3, T, H, W] -> latent: a posterior draw or its mean (`sample`; None: as the regularizer
        is configured, a draw by default as in the original).

        `chunk_frames` (a multiple of the temporal compression) encodes in time chunks to save
        memory; GroupNorm statistics are then per chunk, as in diffusers' default encode.
        """
        return self.regularization(self.moments(x, chunk_frames), sample=sample)

    def moments(self, x: Tensor, chunk_frames: int | None = None) -> Tensor:
        """Video [B, 3, T, H, W] -> the encoder's posterior moments [B, 2C, T', h, w] (mean and log-variance), in
        one pass or `chunk_frames` frames at a time (see `encode`)."""
        if chunk_frames is None:
            return self.encoder(x)
        check_chunk_frames(chunk_frames, self.encoder.temporal_compress_times)
        return stream_over_time(self.encoder, x, chunk_frames)

    def decode(self, z: Tensor, chunk_frames: int | None = 2) -> Tensor:
        """Latent [B, C, T', h, w] -> video, decoding `chunk_frames` latent frames at a time (the first
        chunk also takes the remainder) with a causal conv cache; None decodes in one pass.

        GroupNorm statistics are per chunk, as in the official sampler and diffusers, so chunked and
        one-pass decoding differ slightly. An odd T' gives 4T' - 3 frames; an even T' (from 4k+1
        frames with odd k) gives 4T', as in the official model, which is why CogVideoX uses 8N+1 frames.
        """
        if chunk_frames is None:
            return self.decoder(z)
        check_chunk_frames(chunk_frames, LATENT_CHUNK_MULTIPLE)
        return stream_over_time(self.decoder, z, chunk_frames)

    def decode_tiled(self, z: Tensor, chunk_frames: int | None = 2, tile: int = 32, overlap: int = 8) -> Tensor:
        """`decode` one spatial tile of `tile` x `tile` latent pixels at a time, tiles overlapping by `overlap`
        and blended with linear ramps across the overlap: peak memory that of one tile. Each tile normalises
        with its own GroupNorm statistics, so the result differs slightly from `decode` (tests state how much)."""
        check_tiling(tile, overlap)
        height, width = z.shape[-2:]
        if height <= tile and width <= tile:
            return self.decode(z, chunk_frames)
        out = weight = None
        for top in tile_starts(height, tile, overlap):
            for left in tile_starts(width, tile, overlap):
                piece = self.decode(z[..., top : top + tile, left : left + tile], chunk_frames)  # [B, 3, T, th, tw]
                scale = piece.shape[-1] // min(tile, width - left)  # the VAE's spatial upsampling
                if out is None:
                    out = piece.new_zeros(*piece.shape[:3], height * scale, width * scale)
                    weight = piece.new_zeros(height * scale, width * scale)
                ramp = blend_ramp(piece.shape[-2], overlap * scale, top > 0, top + tile < height, piece)[:, None] * \
                    blend_ramp(piece.shape[-1], overlap * scale, left > 0, left + tile < width, piece)[None, :]
                rows = slice(top * scale, top * scale + piece.shape[-2])
                columns = slice(left * scale, left * scale + piece.shape[-1])
                out[..., rows, columns] += piece * ramp
                weight[rows, columns] += ramp
        return out / weight

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training pass: (reconstruction, sampled latent, {"kl": KL to N(0, I)})."""
        moments = self.encoder(x)
        z = self.regularization(moments, sample=True)
        return self.decoder(z), z, {"kl": self.regularization.kl(moments)}


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size); the last tile ends at `size`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def blend_ramp(length: int, overlap: int, ramp_in: bool, ramp_out: bool, like: Tensor) -> Tensor:
    """[length] weights: rising over the first `overlap` pixels (if ramp_in), falling over the last (if ramp_out)."""
    ramp = torch.ones(length, dtype=like.dtype, device=like.device)
    steps = (torch.arange(overlap, dtype=like.dtype, device=like.device) + 0.5) / overlap
    if ramp_in:
        ramp[:overlap] = steps
    if ramp_out:
        ramp[length - overlap :] = steps.flip(0)
    return ramp


ORIGINAL_CHUNKS = "original"  # args.decode_chunk_frames: the chunks the original decodes a video in


def original_chunk_frames(num_frames: int) -> int:
    """The chunk size whose chunks (`time_chunks`: the first takes the remainder) are those the original decodes
    `num_frames` latent frames in: k = min(10, num_frames // 2) chunks of num_frames // k frames, the first
    num_frames % k of them one longer. Exact where those are even with at most one longer chunk (13, 21 and 41
    frames: 49, 81 and 161 pixel frames); elsewhere the largest multiple of LATENT_CHUNK_MULTIPLE below."""
    chunks = min(10, num_frames // 2)
    size = num_frames // chunks if chunks else num_frames
    return max(LATENT_CHUNK_MULTIPLE, size - size % LATENT_CHUNK_MULTIPLE)


def check_chunk_frames(chunk_frames: int, multiple: int, name: str = "chunk_frames") -> None:
    """Chunks after the first must not start with a lone causal 'first frame' at any resampling level. `name` is
    the option the value came from, for the message."""
    if not is_whole_number(chunk_frames) or chunk_frames <= 0 or chunk_frames % multiple:
        raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {chunk_frames!r}")


def check_tiling(tile: int, overlap: int, names: tuple[str, str] = ("tile", "overlap")) -> None:
    """Tiles of at least one latent pixel that overlap by fewer pixels than their size: a negative overlap would
    leave gaps between tiles. `names` are the options the values came from, for the message."""
    if not (is_whole_number(tile) and is_whole_number(overlap) and 0 <= overlap < tile):
        raise ConfigError(f"{names[0]}={tile!r} with {names[1]}={overlap!r}: need whole numbers, the tile larger "
                          "than the overlap and the overlap >= 0")
