"""satvideo and diffusers side by side, in one process, on whatever device this runs on.

    python scripts/benchmark.py --tiny          # seconds on a CPU: proves every case runs (make test)
    python scripts/benchmark.py --mid           # minutes on a CPU: 5B layout, 4 layers, d=512
    python scripts/benchmark.py --full 5b       # GPU: the real width and depth, 49 x 480 x 720
    ... --compile                               # also satvideo with args.compile (regional torch.compile)
    ... --only vae_decode,forward               # a subset of the cases

Both sides get the same random weights (satvideo's, converted with satvideo.convert) and the same inputs;
each case compares their outputs before timing anything, then runs them in turns (satvideo, diffusers,
satvideo, ...) and reports the median and minimum. Peak memory is the CUDA allocator's peak on a GPU and, on
the CPU, the peak of the bytes held by tensors the call creates (satvideo.profiling.LiveTensorBytes).
On a GPU, MFU counts 24·N·d² + 4·N²·d FLOPs per layer forward (3x for training) against the device's bf16
dense peak, with the measured matmul ceiling beside it. "outputs differ by" is the relative L2 difference a
case checked before timing: against diffusers' output (for the compiled model too, which must also equal eager
within 1e-5 in fp32, gradients included), and for train_step the first loss of DeepSpeed's step against the plain
step's; the one-pass VAE encode is not compared (it normalises over the whole clip, diffusers over 8-frame chunks).
A dated entry goes to benchmarks/RESULTS.md (--append another file, --no-record none); errors are one line.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from satvideo.atomic_files import write_text_atomically  # noqa: E402
from satvideo.cli import check_output_file, run_entrypoint  # noqa: E402
from satvideo.config import ConfigError, SatvideoError, instantiate_from_config, load_config, to_plain  # noqa: E402
from satvideo.convert.transformer import diffusers_transformer_config, sat_to_diffusers_transformer  # noqa: E402
from satvideo.convert.vae import diffusers_vae_config, sat_vae_to_diffusers  # noqa: E402
from satvideo.distributed import init_device  # noqa: E402
from satvideo.dit.positions import rotary_frequencies  # noqa: E402
from satvideo.profiling import peak_memory_bytes, time_alternating  # noqa: E402
from satvideo.training.metrics import peak_flops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


@dataclass
class Size:
    """One benchmark size: the transformer (5B or 2B layout), its token grids, the VAE and the sampling run."""

    name: str
    family: str  # which official YAML the transformer layout comes from
    hidden: int
    layers: int
    heads: int
    text_dim: int
    text_length: int
    grids: list[tuple[int, int, int]]  # token grid (latent frames, height / 2, width / 2) per forward case
    vae: str  # "tiny" (configs/tiny/vae.yaml) or "official" (the family's widths)
    decode_latent_frames: list[int]
    encode_frames: list[int]
    pixels: tuple[int, int]  # VAE input height, width
    sample_steps: int
    repeats: int
    train_layers: int | None = None  # a shallower copy for the training step (one GPU holds no 5B optimizer)
    dtype: torch.dtype = torch.float32


SIZES = {
    "tiny": Size("tiny", "5b", hidden=64, layers=2, heads=4, text_dim=32, text_length=16, grids=[(3, 8, 8)],
                 vae="tiny", decode_latent_frames=[3], encode_frames=[9], pixels=(32, 32), sample_steps=2, repeats=2),
    "mid": Size("mid", "5b", hidden=512, layers=4, heads=8, text_dim=4096, text_length=226,
                grids=[(11, 10, 12), (11, 12, 20)], vae="official", decode_latent_frames=[4, 8, 13],
                encode_frames=[17, 33, 49], pixels=(64, 96), sample_steps=5, repeats=5),
    "2b": Size("2b", "2b", hidden=1920, layers=30, heads=30, text_dim=4096, text_length=226, grids=[(13, 30, 45)],
               vae="official", decode_latent_frames=[13], encode_frames=[49], pixels=(480, 720), sample_steps=50,
               repeats=3, train_layers=8, dtype=torch.bfloat16),
    "5b": Size("5b", "5b", hidden=3072, layers=42, heads=48, text_dim=4096, text_length=226, grids=[(13, 30, 45)],
               vae="official", decode_latent_frames=[13], encode_frames=[49], pixels=(480, 720), sample_steps=50,
               repeats=3, train_layers=4, dtype=torch.bfloat16),
}
CASES = ("forward", "forward_backward", "train_step", "sampling", "vae_decode", "vae_encode")


@dataclass
class Row:
    case: str
    shape: str
    ours: list[float]  # median seconds, per implementation: satvideo, then the others
    names: list[str]
    minimum: list[float] = field(default_factory=list)  # minimum seconds, same order
    memory: list[float] = field(default_factory=list)  # MB, same order
    tokens: int = 0
    flops: float = 0.0
    differences: dict[str, str] = field(default_factory=dict)  # relative L2 checked before timing, per implementation


# --- models -----------------------------------------------------------------------------------------------

def family_network(size: Size, grid: tuple[int, int, int], layers: int | None = None) -> dict:
    """The family's network config at the benchmark's width, depth and latent grid (rotary or sin-cos as the
    family has it), with SAT's `checkpoint_activations` off."""
    config = load_config([ROOT / f"configs/cogvideox_{size.family}.yaml"]).model.network_config
    network = to_plain(config)
    params = network["params"]
    frames, height, width = grid
    params.update(hidden_size=size.hidden, num_layers=layers or size.layers, num_attention_heads=size.heads,
                  latent_height=height * 2, latent_width=width * 2, num_frames=(frames - 1) * 4 + 1,
                  time_embed_dim=min(512, size.hidden), checkpoint_activations=False)
    params["transformer_args"]["checkpoint_activations"] = False
    modules = params["modules"]
    modules["patch_embed_config"]["params"]["text_hidden_size"] = size.text_dim
    pos = modules["pos_embed_config"]["params"]
    pos["text_length"] = size.text_length
    if "hidden_size_head" in pos:
        pos["hidden_size_head"] = size.hidden // size.heads
    return network


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random weights everywhere, norm weights around 1 (the zero-initialised modulations would otherwise
    make every layer an identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.02
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(noise + centre)
    return module


def transformer_pair(network: dict, device: torch.device, dtype: torch.dtype):
    """(satvideo network, diffusers transformer) with the same random weights."""
    from diffusers import CogVideoXTransformer3DModel

    ours = randomize_(instantiate_from_config(network), seed=0)
    theirs = CogVideoXTransformer3DModel(**diffusers_transformer_config(network["params"]))
    theirs.load_state_dict(sat_to_diffusers_transformer(ours.state_dict(), network["params"]["num_layers"]))
    return ours.to(device, dtype), theirs.to(device, dtype)


def transformer_inputs(size: Size, grid: tuple[int, int, int], device: torch.device, batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(1)
    frames, height, width = grid
    return {"x": torch.randn(batch, frames, 16, height * 2, width * 2, generator=generator).to(device, size.dtype),
            "timesteps": torch.randint(0, 1000, (batch,), generator=generator).to(device),
            "context": torch.randn(batch, size.text_length, size.text_dim, generator=generator).to(device, size.dtype)}


def diffusers_forward(model, inputs: dict):
    """diffusers' transformer on satvideo-style inputs, with the rotary table at the input's grid."""
    config = model.config
    _, frames, _, height, width = inputs["x"].shape
    extra = {}
    if config.use_rotary_positional_embeddings:
        angles = rotary_frequencies(config.attention_head_dim, (frames, height // 2, width // 2)).to(inputs["x"].device)
        extra["image_rotary_emb"] = (angles.cos(), angles.sin())
    return model(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], timestep=inputs["timesteps"],
                 return_dict=False, **extra)[0]


def layer_flops(tokens: int, hidden: int) -> float:
    """Forward FLOPs of one transformer layer: 24·N·d² (projections and MLP) + 4·N²·d (attention)."""
    return 24 * tokens * hidden**2 + 4 * tokens**2 * hidden


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Relative L2 difference ||ours - theirs|| / ||theirs||."""
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()


def compare(label: str, ours: torch.Tensor, theirs: torch.Tensor, tolerance: float, what: str = "satvideo and diffusers"
            ) -> str:
    difference = relative_difference(ours, theirs)
    if not difference <= tolerance:
        raise SatvideoError(f"{label}: {what} disagree (relative L2 {difference:.2e} > {tolerance:.0e}); not timing "
                            "implementations that compute different things")
    return f"{difference:.1e}"


def gradients(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Every parameter gradient of the forward_backward case's loss, flattened into one vector."""
    model.zero_grad(set_to_none=True)
    model(**inputs).float().square().mean().backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return flat


# --- cases ------------------------------------------------------------------------------------------------

def measure(row: Row, functions: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            memory: bool = True) -> Row:
    timings = time_alternating(functions, repeats, device)
    row.names = list(functions)
    row.ours = [timings[name].median for name in functions]
    row.minimum = [timings[name].min for name in functions]
    if memory:
        row.memory = [peak_memory_bytes(fn, device) / 2**20 for fn in functions.values()]
    return row


def forward_cases(size: Size, device: torch.device, use_compile: bool, backward: bool) -> list[Row]:
    rows = []
    tolerance = 1e-4 if size.dtype == torch.float32 else 2e-2
    compiled_tolerance = 1e-5 if size.dtype == torch.float32 else 2e-2  # args.compile against eager
    for grid in size.grids:
        network = family_network(size, grid)
        ours, theirs = transformer_pair(network, device, size.dtype)
        inputs = transformer_inputs(size, grid, device)
        tokens = size.text_length + math.prod(grid)
        with torch.no_grad():
            theirs_output = diffusers_forward(theirs, inputs)
            checked = compare(f"forward {grid}", ours(**inputs), theirs_output, tolerance)
        implementations = {"satvideo": ours, "diffusers": theirs}
        differences = {"satvideo": checked}
        if use_compile:
            compiled = copy.deepcopy(ours)
            compiled.compile_layers()
            with torch.no_grad():
                compiled_output = compiled(**inputs)
                compare(f"compiled forward {grid}", compiled_output, ours(**inputs), compiled_tolerance,
                        "args.compile and eager")
                differences["satvideo compiled"] = f"{relative_difference(compiled_output, theirs_output):.1e}"
            if backward:
                compare(f"compiled gradients {grid}", gradients(compiled, inputs), gradients(ours, inputs),
                        compiled_tolerance, "args.compile and eager")
            implementations["satvideo compiled"] = compiled

        def run(name: str, model) -> Callable[[], object]:
            call = (lambda: diffusers_forward(model, inputs)) if name == "diffusers" else (lambda: model(**inputs))
            if not backward:
                def forward_only():
                    with torch.no_grad():
                        return call()
                return forward_only

            def forward_backward():
                model.zero_grad(set_to_none=True)
                call().float().square().mean().backward()
            return forward_backward

        functions = {name: run(name, model) for name, model in implementations.items()}
        case = "forward_backward" if backward else "forward"
        row = measure(Row(case, f"{tokens} tokens", [], []), functions, size.repeats, device)
        row.tokens, row.differences = tokens, differences
        row.flops = layer_flops(tokens, size.hidden) * size.layers * (3 if backward else 1)
        rows.append(row)
    return rows


def train_step_case(size: Size, device: torch.device) -> Row:
    """One optimizer step as train_video.py takes it (engine loss, DeepSpeed ZeRO-2 backward and step; and under
    ZeRO stage 0), the same engine loss with a plain torch AdamW step, and diffusers' fine-tuning recipe
    (v-prediction turned into an x0 estimate, 1/(1 - ᾱ) weights) with torch AdamW; all from cached latents and
    text features."""
    from satvideo.config import args_namespace
    from satvideo.training.deepspeed_setup import deepspeed_config
    from satvideo.training.loop import build_deepspeed_engine
    from satvideo.training.lr_schedule import weight_decay_groups

    grid = size.grids[0]
    network = family_network(size, grid, layers=size.train_layers)
    precision = [] if size.dtype == torch.float32 else ["args.bf16=true"]
    config = load_config([ROOT / "configs/tiny/model.yaml", ROOT / "configs/tiny/vae.yaml", ROOT / "configs/tiny/train.yaml"],
                         ["args.batch_size=1", f"args.device={device.type}", *precision])
    config.model.network_config = OmegaConf.create(network)
    config.model.conditioner_config.params.emb_models[0].params.d_model = size.text_dim
    config.model.conditioner_config.params.emb_models[0].params.max_length = size.text_length

    def deepspeed_engine(stage: int):
        stage_args = args_namespace(config)
        stage_args.zero_stage = stage
        ds = deepspeed_config(config, stage_args, device.type == "cuda")
        model, _ = build_deepspeed_engine(config, stage_args, ds, device, load_weights=False)
        randomize_(model.module.network, seed=0)
        return model

    ds_model, stage0_model = deepspeed_engine(2), deepspeed_engine(0)

    from satvideo.engine import VideoDiffusionEngine
    torch.manual_seed(0)
    plain_engine = VideoDiffusionEngine.from_config(config.model).to(device)
    plain_engine.network.load_state_dict(ds_model.module.network.state_dict())
    plain_engine.place_frozen_parts(device, size.dtype)
    plain_optimizer = torch.optim.AdamW(weight_decay_groups(plain_engine), lr=1e-5, betas=(0.9, 0.95))

    generator = torch.Generator().manual_seed(2)
    frames, height, width = grid
    batch = {"moments": torch.randn(1, 32, frames, height * 2, width * 2, generator=generator).to(device),
             "text_features": torch.randn(1, size.text_length, size.text_dim, generator=generator).to(device),
             "txt": ["a prompt"]}

    def deepspeed_step(model=ds_model):
        loss = model(dict(batch))
        model.backward(loss)
        model.step()
        return loss.detach()

    def plain_step():
        loss = plain_engine(dict(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_engine.network.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    torch.manual_seed(3)
    first_ds = deepspeed_step()
    torch.manual_seed(3)
    first_plain = plain_step()
    checked = compare("training step loss", first_ds[None], first_plain[None], 1e-5, "DeepSpeed and plain steps")
    torch.manual_seed(3)
    checked_stage_0 = compare("ZeRO stage 0 training step loss", deepspeed_step(stage0_model)[None], first_plain[None],
                              1e-5, "DeepSpeed and plain steps")

    diffusers_step = diffusers_train_step(network, plain_engine, batch, size, device)
    row = measure(Row("train_step", f"{size.text_length + math.prod(grid)} tokens", [], []),
                  {"satvideo deepspeed": deepspeed_step,
                   "satvideo deepspeed stage 0": lambda: deepspeed_step(stage0_model),
                   "satvideo plain": plain_step, "diffusers": diffusers_step},
                  size.repeats, device)
    row.tokens = size.text_length + math.prod(grid)
    row.flops = 3 * layer_flops(row.tokens, size.hidden) * (size.train_layers or size.layers)
    row.differences = {"satvideo deepspeed": checked, "satvideo deepspeed stage 0": checked_stage_0}
    return row


def diffusers_train_step(network: dict, engine, batch: dict, size: Size, device: torch.device) -> Callable[[], object]:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(**diffusers_transformer_config(network["params"]))
    model.load_state_dict(sat_to_diffusers_transformer(engine.network.state_dict(), network["params"]["num_layers"]))
    model.to(device, size.dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=1.0)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    moments = batch["moments"]

    def step():
        mean, logvar = moments.chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).permute(0, 2, 1, 3, 4).to(size.dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        velocity = diffusers_forward(model, {"x": noisy, "context": batch["text_features"].to(size.dtype),
                                             "timesteps": timesteps})
        x0 = scheduler.get_velocity(velocity, noisy, timesteps)
        weights = (1 / (1 - alphas_cumprod[timesteps])).view(-1, 1, 1, 1, 1)
        loss = (weights * (x0.float() - latents.float()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sampling_case(size: Size, device: torch.device) -> Row:
    """`sample_steps` DDIM steps with dynamic classifier-free guidance from the same initial noise and text
    features: satvideo's engine.sample against diffusers' CogVideoXPipeline (output_type="latent")."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    from satvideo.diffusion.samplers import randn
    from satvideo.engine import VideoDiffusionEngine

    grid = size.grids[0]
    network = family_network(size, grid)
    config = load_config([ROOT / "configs/tiny/model.yaml", ROOT / "configs/tiny/vae.yaml"])
    config.model.network_config = OmegaConf.create(network)
    config.model.sampler_config = OmegaConf.create({
        "target": "satvideo.diffusion.VideoDDIMSampler",
        "params": {"num_steps": size.sample_steps,
                   "discretization_config": {"target": "satvideo.diffusion.ZeroSNRDDPMDiscretization",
                                             "params": {"shift_scale": 1.0, "timestep_spacing": "trailing"}},
                   "guider_config": {"target": "satvideo.diffusion.DynamicCFG",
                                     "params": {"scale": 6, "exp": 5, "num_steps": size.sample_steps}}}})
    engine = VideoDiffusionEngine.from_config(config.model)
    randomize_(engine.network, seed=0)
    engine.to(device).place_frozen_parts(device, size.dtype)
    engine.network.to(size.dtype)
    _, theirs = transformer_pair(network, device, size.dtype)
    theirs.load_state_dict(sat_to_diffusers_transformer(engine.network.state_dict(), size.layers))
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=1.0, set_alpha_to_one=True,
                                       clip_sample=False)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=16, norm_num_groups=4)
    pipeline = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=theirs, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)

    frames, height, width = grid
    latent_shape = (frames, 16, height * 2, width * 2)
    noise = randn((1, *latent_shape), torch.Generator().manual_seed(4), device, size.dtype)
    text = torch.randn(1, size.text_length, size.text_dim, generator=torch.Generator().manual_seed(5))
    text = text.to(device, size.dtype)
    cond, uncond = {"crossattn": text}, {"crossattn": torch.zeros_like(text)}

    def ours():
        return engine.sample(["a prompt"], latent_shape, torch.Generator().manual_seed(4), text=(cond, uncond))

    def diffusers_sampling():
        return pipeline(prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), height=height * 16,
                        width=width * 16, num_frames=(frames - 1) * 4 + 1, num_inference_steps=size.sample_steps,
                        guidance_scale=6, use_dynamic_cfg=True, latents=noise.clone(), output_type="latent",
                        return_dict=False)[0]

    with torch.no_grad():
        checked = compare("sampling", ours(), diffusers_sampling(), 1e-3 if size.dtype == torch.float32 else 5e-2)
        row = measure(Row("sampling", f"{size.sample_steps} steps, CFG", [], []),
                      {"satvideo": ours, "diffusers": diffusers_sampling}, max(2, size.repeats // 3), device)
    row.tokens = size.text_length + math.prod(grid)
    row.flops = 2 * size.sample_steps * layer_flops(row.tokens, size.hidden) * size.layers
    row.differences = {"satvideo": checked}
    return row


def vae_pair(size: Size, device: torch.device):
    from diffusers import AutoencoderKLCogVideoX

    if size.vae == "tiny":
        config = to_plain(OmegaConf.load(ROOT / "configs/tiny/vae.yaml").model.first_stage_config)
    else:
        config = to_plain(load_config([ROOT / f"configs/cogvideox_{size.family}.yaml"]).model.first_stage_config)
        config["params"].pop("ckpt_path", None)
    ours = randomize_(instantiate_from_config(config), seed=5).eval()
    params = config["params"]
    theirs = AutoencoderKLCogVideoX(**diffusers_vae_config(to_plain(params["encoder_config"]["params"]),
                                                           to_plain(params["decoder_config"]["params"]))).eval()
    theirs.load_state_dict(sat_vae_to_diffusers(ours.state_dict()))
    return ours.to(device, size.dtype), theirs.to(device, size.dtype)


def vae_cases(size: Size, device: torch.device, encode: bool) -> list[Row]:
    """Decode with both libraries' defaults (2 latent frames per chunk); encode as training does it in each:
    satvideo in one pass as the original, and with `model.encode_chunk_frames=8`; diffusers in its default
    8-frame chunks."""
    ours, theirs = vae_pair(size, device)
    generator = torch.Generator().manual_seed(6)
    height, width = size.pixels
    rows = []
    for frames in size.encode_frames if encode else size.decode_latent_frames:
        with torch.no_grad():
            if encode:
                video = (torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1).to(device, size.dtype)
                functions = {"satvideo": lambda: ours.encode(video, sample=False),
                             "satvideo chunked": lambda: ours.encode(video, sample=False, chunk_frames=8),
                             "diffusers": lambda: theirs.encode(video).latent_dist.mode()}
                # the one-pass encode normalises over the whole clip, diffusers over 8-frame chunks: not compared
                differences = {"satvideo chunked": compare("VAE encode", functions["satvideo chunked"](),
                                                           functions["diffusers"](), 1e-4)}
                shape = f"{frames} frames"
            else:
                latents = torch.randn(1, 16, frames, height // 8, width // 8, generator=generator).to(device, size.dtype)
                functions = {"satvideo": lambda: ours.decode(latents), "diffusers": lambda: theirs.decode(latents).sample}
                differences = {"satvideo": compare("VAE decode", functions["satvideo"](), functions["diffusers"](),
                                                   1e-4)}
                shape = f"{frames} latent frames"
            row = measure(Row("vae_encode" if encode else "vae_decode", shape, [], []), functions,
                          max(2, size.repeats // 2), device)
        row.differences = differences
        rows.append(row)
    return rows


# --- report -----------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def matmul_ceiling_tflops(device: torch.device) -> float:
    """Measured bf16 dense matmul throughput (8192³), the practical ceiling MFU is read against."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    timing = time_alternating({"mm": lambda: a @ b}, repeats=10, device=device, warmup=3)["mm"]
    return 2 * 8192**3 / timing.median / 1e12


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from the table the training log's MFU uses."""
    flops = peak_flops(device)
    return flops / 1e12 if flops else None


def format_table(rows: list[Row], device: torch.device) -> str:
    peak = peak_tflops(device) if device.type == "cuda" else None
    lines = ["| case | shape | implementation | median s | min s | peak MB | vs diffusers (time, memory) | "
             "tokens/s | MFU | outputs differ by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        reference = row.names.index("diffusers")
        for i, name in enumerate(row.names):
            ratio = f"{row.ours[i] / row.ours[reference]:.2f}"
            if row.memory:
                ratio += f", {row.memory[i] / row.memory[reference]:.2f}"
            tokens = f"{row.tokens / row.ours[i]:,.0f}" if row.tokens else ""
            mfu = f"{row.flops / row.ours[i] / (peak * 1e12):.1%}" if peak and row.flops else ""
            memory = f"{row.memory[i]:,.0f}" if row.memory else ""
            lines.append(f"| {row.case} | {row.shape} | {name} | {row.ours[i]:.3f} | {row.minimum[i]:.3f} | "
                         f"{memory} | {ratio} | {tokens} | {mfu} | {row.differences.get(name, '')} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_results(path: Path) -> str:
    """The text of an --append file (empty when it does not exist yet); ConfigError when it cannot be one."""
    check_output_file(path, "--append", overwrite=True, make_folders=True)  # the entry is added to what is there
    if not path.exists():
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--append {path}: cannot be read as text ({error})") from error


def append_entry(path: Path, text: str, command: str, device: torch.device) -> None:
    """A dated entry (device, commit, command, then `text`) added to `path`, which is replaced whole."""
    earlier = read_results(path) or "# Benchmark results\n\nEntries appended by the benchmark scripts, newest last.\n"
    heading = f"## {datetime.date.today().isoformat()} · {device_name(device)} · commit {commit()}"
    entry = f"\n{heading}\n\n`{command}`\n\n{text}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, earlier + entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tiny", action="store_true", help="a few seconds per case on a CPU")
    group.add_argument("--mid", action="store_true", help="5B layout, 4 layers, d=512: minutes on a CPU")
    group.add_argument("--full", choices=["2b", "5b"], help="the real model size (a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="also time satvideo with args.compile in the forward and forward_backward cases")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--append", type=Path, default=RESULTS,
                        help=f"the file to add the dated entry to (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--no-record", action="store_true", help="print only; append to no file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    options = parser.parse_args()
    cases = [case for case in options.only.split(",") if case]
    unknown = set(cases) - set(CASES)
    if unknown or not cases:
        problem = f"unknown case(s) {', '.join(sorted(unknown))}" if unknown else f"no case in {options.only!r}"
        raise ConfigError(f"--only: {problem}; choose from {', '.join(CASES)}")
    if not options.no_record:
        read_results(options.append)  # a file that cannot take the entry is refused before anything runs

    size = SIZES["tiny" if options.tiny else "mid" if options.mid else options.full]
    device = init_device(None if options.full else "cpu")
    if options.full and device.type != "cuda":
        raise ConfigError("--full needs a CUDA GPU; on the CPU use --mid")
    logging.getLogger("satvideo").setLevel(logging.WARNING)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()

    rows: list[Row] = []
    for case in cases:
        print(f"[benchmark] {case} ...", flush=True)
        if case in ("forward", "forward_backward"):
            rows += forward_cases(size, device, options.compile, backward=case == "forward_backward")
        elif case == "train_step":
            rows.append(train_step_case(size, device))
        elif case == "sampling":
            rows.append(sampling_case(size, device))
        else:
            rows += vae_cases(size, device, encode=case == "vae_encode")
    table = format_table(rows, device)
    print(table)
    notes = []
    if device.type == "cuda":
        notes.append(f"measured bf16 matmul ceiling: {matmul_ceiling_tflops(device):.0f} TFLOP/s "
                     f"(datasheet dense peak {peak_tflops(device)} TFLOP/s)")
    if not options.no_record:
        text = "\n".join([table, ""] + [f"- {note}" for note in notes]) if notes else table
        append_entry(options.append, text, shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]]), device)
        print(f"[benchmark] appended to {options.append}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_entrypoint(main)
