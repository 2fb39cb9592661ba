"""CogVideoX 3D causal VAE with the state-dict layout of the official SAT `3d-vae.pt`."""
from satvideo.vae.autoencoder import VideoAutoencoder
from satvideo.vae.decoder import ContextParallelDecoder3D
from satvideo.vae.encoder import ContextParallelEncoder3D
from satvideo.vae.regularizer import DiagonalGaussianRegularizer

__all__ = ["ContextParallelDecoder3D", "ContextParallelEncoder3D", "DiagonalGaussianRegularizer", "VideoAutoencoder"]
