"""Diagonal Gaussian posterior over the latent, as predicted by the encoder."""
import torch
from torch import Tensor, nn

# Bounds on the log-variance, so that exp() can neither underflow to 0 nor overflow.
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussianRegularizer(nn.Module):
    """Split moments [B, 2C, ...] into mean and log-variance; return a latent and the KL to N(0, I)."""

    def forward(self, moments: Tensor, sample: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        kl_per_element = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        kl = kl_per_element.flatten(1).sum(dim=1).mean()  # summed over the latent, averaged over the batch
        return z, {"kl": kl}
