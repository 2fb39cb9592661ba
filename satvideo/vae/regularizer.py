"""Diagonal Gaussian posterior over the latent, as predicted by the encoder."""
import torch
from torch import Tensor, nn

# Bounds on the log-variance, so that exp() can neither underflow to 0 nor overflow.
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussianRegularizer(nn.Module):
    """Split moments [B, 2C, ...] into mean and log-variance and return a latent: a draw from the posterior
    when `sample` is true (the official default, what the original trains on), else its mean.
    """

    def __init__(self, sample: bool = True):
        super().__init__()
        self.sample = sample

    def forward(self, moments: Tensor, sample: bool | None = None) -> Tensor:
        """`sample` overrides the configured choice for one call."""
        mean, logvar = moments.chunk(2, dim=1)
        if not (self.sample if sample is None else sample):
            return mean
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    @staticmethod
    def kl(moments: Tensor) -> Tensor:
        """KL(posterior || N(0, I)), summed over the latent and averaged over the batch (VAE training only)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return (0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)).flatten(1).sum(dim=1).mean()
