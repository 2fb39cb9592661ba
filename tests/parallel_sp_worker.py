"""Run under torchrun: the tiny transformer of each family with its video tokens split over all ranks, against
the same network on one rank. Writes {family: {"output": rel. error, "grads": rel. error}} to argv[1] (rank 0).

The gradient compared is the sum over ranks divided by their number: each rank computes the full loss, so the
summed gradient is world_size times the one-rank gradient (see satvideo/parallel/sequence.py)."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from conftest import FAMILIES, tiny_inputs, tiny_network_config
from satvideo.config import instantiate_from_config
from satvideo.parallel.sequence import enable_sequence_parallel


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


def loss_of(output: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, output.numel()).view_as(output)  # every output element matters
    return (output * weights).sum()


def uneven_grid(family: str, inputs: dict) -> dict:
    """Latents of 30 patches (3 x 2 x 5), which split unevenly over 4 ranks; the learnable position table of
    5B-I2V covers only its configured 4 x 4 patches, so that family keeps its 48."""
    if family == "5b_i2v":
        return inputs
    frames = inputs["x"].shape[1] * 3 // 2 if family.startswith("1.5") else inputs["x"].shape[1]  # 6 or 3
    generator = torch.Generator().manual_seed(2)
    for key in ("x", "concat_images"):
        if key in inputs:
            batch, _, channels = inputs[key].shape[:3]
            inputs[key] = torch.randn(batch, frames, channels, 4, 10, generator=generator)
    return inputs


def compare(family: str, checkpoint_activations: bool = False) -> dict:
    torch.manual_seed(0)
    reference = instantiate_from_config(tiny_network_config(family))
    for parameter in reference.parameters():  # no zero-initialised modulation: every path carries gradient
        torch.nn.init.normal_(parameter, std=0.05)
    parallel = copy.deepcopy(reference)
    parallel.transformer.checkpoint_activations = checkpoint_activations  # collectives recomputed in backward
    enable_sequence_parallel(parallel, dist.group.WORLD)
    inputs = uneven_grid(family, tiny_inputs(family, batch=2, seed=1))
    expected = reference(**inputs)
    loss_of(expected).backward()
    got = parallel(**inputs)
    loss_of(got).backward()
    summed, expected_grads = [], []
    for p_ref, p_par in zip(reference.parameters(), parallel.parameters()):
        grad = p_par.grad.clone()
        dist.all_reduce(grad)
        summed.append(grad.flatten() / dist.get_world_size())
        expected_grads.append(p_ref.grad.flatten())
    # over all gradients at once: some are zero in exact arithmetic (a key LayerNorm bias shifts every score of a
    # query alike, which softmax ignores), so a per-tensor relative error would compare rounding noise
    grads = relative_error(torch.cat(summed), torch.cat(expected_grads))
    return {"output": relative_error(got, expected), "grads": grads}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {family: compare(family) for family in FAMILIES}
    results["5b, activation checkpointing"] = compare("5b", checkpoint_activations=True)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as file:
            json.dump(results, file, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
