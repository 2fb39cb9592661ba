"""Sample videos from a trained model, with the same configs as training.

    python sample_video.py --base configs/tiny/model.yaml configs/tiny/sample.yaml args.load=checkpoints/tiny
    python sample_video.py --base configs/cogvideox_5b.yaml configs/inference.yaml args.input_file=prompts.txt

Requests come from `args.input_file`: one prompt per line (`prompt@@image.png` for image-to-video), or a .jsonl
file with `prompt` and optionally `negative_prompt`, `seed`, `image`, `video` + `strength` (video-to-video),
`video` + `continue_frames` (continuation) and `num_frames`; or, with `args.input_type=cli`, from the terminal.
Every request is checked before any weight loads. Each video gets an mp4 (or, with `args.only_save_latents`, a
safetensors file of latents) in `args.output_dir`, never over an earlier file, a JSON sidecar describing how to
make it again, and a line in `manifest.jsonl`. `args.load` may be a LoRA adapter checkpoint; `args.lora` merges
further adapters; `args.use_ema` loads the checkpoint's EMA weights.
"""

import argparse
import hashlib
import logging
import sys
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from satvideo import distributed
from satvideo.checkpoint import adapters_base, load_network, lora_metadata, resolve_model_states
from satvideo.cli import parse_config, run_entrypoint
from satvideo.conditioner import caption_tokenizer
from satvideo.config import ConfigError, SatvideoError, args_namespace, to_plain
from satvideo.engine import VideoDiffusionEngine, check_decode_args
from satvideo.parallel.layout import Layout, build_layout
from satvideo.parallel.sequence import enable_sequence_parallel
from satvideo.sampling import (OutputWriter, VideoPlan, VideoRequest, adapter_list, add_lora_from_checkpoint,
                               file_sha256, interactive_prompts, merge_adapters, read_requests, request_from_line,
                               sampling_dtype, slugify, warn_of_long_prompts)

logger = logging.getLogger("sample_video")


def satvideo_version() -> str:
    try:
        return version("satvideo")
    except PackageNotFoundError:
        return "unknown"


def guidance_record(sampler) -> dict:
    guider = sampler.guider
    if guider is None:
        return {"name": None}
    record = {"name": type(guider).__name__, "scale": guider.scale}
    if hasattr(guider, "exp"):
        record.update(exp=guider.exp, schedule="1 + scale * (1 - cos(pi * ((steps - t) / steps) ** exp)) / 2")
    return record


def checkpoint_record(checkpoint: Path, adapters: dict | None, args: argparse.Namespace) -> dict:
    """The weights the videos come from: the checkpoint file and, for an adapter-only checkpoint (`adapters`: its
    LoRA record), the base file its adapters were loaded over (args.lora_base, else the base the checkpoint
    records)."""
    record = {"path": str(checkpoint), "sha256": file_sha256(checkpoint), "ema": args.use_ema}
    if adapters is not None:
        base = resolve_model_states(adapters_base(adapters, checkpoint, args.lora_base))
        record["base"] = {"path": str(base), "sha256": file_sha256(base), "lora_scale": args.lora_scale}
    return record


def batches(requests: list, size: int) -> list[list]:
    """Plain generations of the same shape share a batch of up to `size`; anything else goes alone."""
    groups, pending = [], []
    for request in requests:
        if request.video or request.image or request.num_frames or size == 1:
            groups.append([request])
            continue
        pending.append(request)
        if len(pending) == size:
            groups.append(pending)
            pending = []
    return groups + ([pending] if pending else [])


def main() -> None:
    config = parse_config("Sample videos from a video diffusion transformer.")
    args = args_namespace(config)
    if not args.load:
        raise ConfigError("args.load: give the checkpoint to sample from (a run folder, iteration folder or file)")
    checkpoint = resolve_model_states(args.load)
    adapters_over = lora_metadata(checkpoint)
    if adapters_over is not None:  # the base they load over is found before anything is built
        adapters_base(adapters_over, checkpoint, args.lora_base)
    check_decode_args(args)
    plan = VideoPlan(args, config.model.network_config.params)
    adapters = adapter_list(args.lora)
    interactive = args.input_type == "cli"
    requests = [] if interactive else read_requests(args)
    for request in requests:  # everything is checked before any weight loads
        if not request.negative_prompt:
            request.negative_prompt = args.negative_prompt
        plan.check(request)
    tokenizer = caption_tokenizer(to_plain(config.model.conditioner_config))
    warn_of_long_prompts(requests, tokenizer)
    writer = OutputWriter(args.output_dir, args.overwrite, args.contact_sheet)

    device = distributed.init_device(args.device)
    if interactive and distributed.world_size() > 1:
        raise ConfigError("args.input_type=cli reads the terminal: run it in one process, not under torchrun")
    # replicas share the requests; the ranks of one sequence/CFG group sample the same videos together
    layout = build_layout(args.sequence_parallel_size, args.cfg_parallel_size,
                          config.model.network_config.params.get("num_attention_heads"))
    requests = requests[layout.data_rank::layout.data_size]

    add_lora_from_checkpoint(config, args.load)
    torch.manual_seed(args.seed)  # parts without weight files (tiny test models) are the same in every run
    engine = VideoDiffusionEngine.from_config(config.model, checkpoint_activations=False)  # no backward pass
    load_network(engine.network, args.load, strict=args.strict_load, lora_base=args.lora_base,
                 lora_scale=args.lora_scale, use_ema=args.use_ema)
    merge_adapters(engine.network, adapters)
    dtype = sampling_dtype(args)
    engine.to(device, dtype).eval()
    engine.place_frozen_parts(device, dtype)
    if args.compile:
        engine.network.compile_layers()
    if layout.sequence_group is not None:
        enable_sequence_parallel(engine.network, layout.sequence_group)
    engine.model.cfg_group = layout.cfg_group
    writer = writer if layout.leads_its_group else None  # the others take part in sampling, not in writing
    run_record = {
        "sampler": {"name": type(engine.sampler).__name__, "num_steps": engine.sampler.num_steps},
        "guidance": guidance_record(engine.sampler), "fps": args.sampling_fps,
        "decode": {"chunk_frames": args.decode_chunk_frames, "tiling": args.vae_tiling,
                   "tile_overlap": args.vae_tile_overlap},
        "checkpoint": checkpoint_record(checkpoint, adapters_over, args),
        "adapters": [{"path": path, "scale": scale} for path, scale in adapters],
        "config_sha256": hashlib.sha256(OmegaConf.to_yaml(config, resolve=True).encode()).hexdigest(),
        "satvideo_version": satvideo_version(), "dtype": str(dtype).removeprefix("torch."),
        "parallel": {"sequence": layout.sequence_size, "cfg": layout.cfg_size, "data": layout.data_size},
    }

    negative = next((request for request in requests if request.negative_prompt), None)
    if negative is not None and not engine.sampler.guides():
        logger.warning("request %d (%r) has a negative prompt, but this sampler's guidance never uses the "
                       "unconditional pass (no guider, or a scale of 1 at every step): it has no effect",
                       negative.index, negative.prompt[:40])
    texts = {}
    if not interactive:  # encode every prompt now, then T5 can leave the GPU
        for request in requests:
            texts[request.index] = engine.encode_prompts([request.prompt], [request.negative_prompt])
        if args.offload_text_encoder:
            engine.conditioner.to("cpu")
    source = ([request] for request in typed_requests(plan, args, tokenizer)) if interactive else \
        batches(requests, args.batch_size or 1)
    start, written, run_peak = time.perf_counter(), [], 0.0
    bar = tqdm(total=len(requests), desc="prompts", disable=interactive or not requests)
    for group in source:
        if interactive:
            texts[group[0].index] = engine.encode_prompts([group[0].prompt], [group[0].negative_prompt])
        written += sample_group(engine, plan, group, texts, writer, args, run_record, device, layout)
        run_peak = max(run_peak, distributed.peak_memory_gb(device))
        bar.update(len(group))
    bar.close()
    elapsed = time.perf_counter() - start
    if written:
        print(f"{len(written)} videos in {elapsed:.1f} s ({elapsed / len(written):.1f} s per video, peak memory "
              f"{run_peak:.2f} GB) in {args.output_dir}", flush=True)


def typed_requests(plan: VideoPlan, args, tokenizer: tuple | None) -> Iterator[VideoRequest]:
    """Requests typed in the terminal (args.input_type=cli); a line that fails its check is reported and the next
    one read, the model staying loaded."""
    for index, line in enumerate(interactive_prompts()):
        request = request_from_line(line, index, args.seed + index * args.num_samples)
        request.negative_prompt = request.negative_prompt or args.negative_prompt
        try:
            plan.check(request)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            continue
        warn_of_long_prompts([request], tokenizer)
        yield request


def decode(engine, latents: torch.Tensor, args, layout: Layout) -> torch.Tensor:
    """[1, T', C, h, w] latents -> [1, T, 3, H, W] video, over the sequence-parallel group when there is one."""
    return engine.decode_first_stage(latents, chunk_frames=args.decode_chunk_frames, tile=args.vae_tiling,
                                     overlap=args.vae_tile_overlap, context_group=layout.sequence_group)


def check_finite(values: torch.Tensor, group: list, samples: int, what: str) -> torch.Tensor:
    """`values` [len(group) * samples, ...]; a SatvideoError naming the first request whose values hold NaN or inf
    (an overflow in half precision, or weights that were damaged), which would be written as a black video."""
    finite = torch.isfinite(values.flatten(1)).all(dim=1).tolist()
    if not all(finite):
        request = group[finite.index(False) // samples]
        raise SatvideoError(f"request {request.index} ({request.prompt[:40]!r}): the {what} hold NaN or inf (an "
                            "overflow in half precision?); nothing was written for it")
    return values


def sample_group(engine, plan: VideoPlan, group: list, texts: dict, writer: OutputWriter | None, args,
                 run_record: dict, device: torch.device, layout: Layout) -> list:
    """Sample one batch of requests (num_samples videos each) and write every video with its sidecar (no writer: a
    rank that helps another sample them)."""
    start = time.perf_counter()
    distributed.peak_memory_gb(device, reset=True)  # on a GPU each batch reports its own peak
    samples = args.num_samples
    first = group[0]
    shape, first_frames, clip = plan.inputs(first, samples)
    if len(group) > 1:  # plain generations of one shape: stack their prompts and texts
        text = tuple({key: torch.cat([texts[r.index][part][key] for r in group for _ in range(samples)])
                      for key in texts[first.index][part]} for part in (0, 1))
    else:
        text = tuple({key: value.expand(samples, *value.shape[1:]) for key, value in part.items()}
                     for part in texts[first.index])
    generators = [torch.Generator().manual_seed(r.seed + s) for r in group for s in range(samples)]
    init = prefix = None
    if clip is not None:
        latents = engine.encode_first_stage(clip[None].to(device, next(engine.parameters()).dtype), sample=False)
        latents = latents.expand(samples, -1, -1, -1, -1)
        init, prefix = (latents, None) if first.strength is not None else (None, latents[:, : first.continue_frames])
    prompts = [r.prompt for r in group for _ in range(samples)]
    latents = engine.sample(prompts, shape, generators, first_frames=first_frames, text=text, init_latents=init,
                            strength=first.strength if first.strength is not None else 1.0, prefix_latents=prefix)
    check_finite(latents, group, samples, "sampled latents")
    if writer is None:  # a helper rank; those of a sequence-parallel group also share the decoding
        if layout.sequence_group is not None and layout.cfg_rank == 0 and not args.only_save_latents:
            for position in range(len(prompts)):
                decode(engine, latents[position : position + 1], args, layout)
        return []
    seconds = (time.perf_counter() - start) / len(prompts)
    paths = []
    for position, request in enumerate(r for r in group for _ in range(samples)):
        sample = position % samples
        stem = f"{request.index:03d}_{sample}_{slugify(request.prompt)}"
        record = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed + sample,
                  "mode": request.mode, "image": request.image, "video": request.video, "strength": request.strength,
                  "continue_frames": request.continue_frames, "size": [shape[2] * 8, shape[3] * 8],
                  "batch": [r.index for r in group], **run_record}
        one = latents[position : position + 1]
        if args.only_save_latents:  # unscaled VAE latents [C, T', h, w], as the original's latent.pt
            unscaled = (one[0] / engine.scale_factor).permute(1, 0, 2, 3).contiguous().float().cpu()
            record.update(frames=4 * (shape[0] - 1) + 1, seconds=seconds, peak_memory_gb=distributed.peak_memory_gb(device))
            paths.append(writer.write(stem, record, latents={"latents": unscaled}))
        else:
            video = check_finite(decode(engine, one, args, layout), [request], 1, "decoded video")[0].cpu()
            record.update(frames=video.shape[0], seconds=seconds, peak_memory_gb=distributed.peak_memory_gb(device))
            paths.append(writer.write(stem, record, video=video, fps=args.sampling_fps))
        print(f"wrote {paths[-1]}", flush=True)
    return paths


if __name__ == "__main__":
    run_entrypoint(main)
