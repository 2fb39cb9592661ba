"""sample_video.py as a product: nothing overwritten, a sidecar per video that reproduces it, inputs checked
before weights load, negative prompts, video-to-video and continuation, adapters merged over a base."""

import hashlib
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_sat
from test_trust import failing
from test_training import ROOT, run

from satvideo.checkpoint import MODEL_STATES
from satvideo.config import CheckpointError, ConfigError, load_config
from satvideo.data.toy import make_toy_dataset
from satvideo.data.video import read_mp4, write_mp4
from satvideo.diffusion.guiders import VanillaCFG
from satvideo.engine import VideoDiffusionEngine
from satvideo.sampling import merge_adapters

TINY = ["configs/tiny/model.yaml", "configs/tiny/vae.yaml"]
STEPS = ["model.sampler_config.params.num_steps=3", "model.sampler_config.params.guider_config.params.num_steps=3"]
LORA = ["configs/lora.yaml", "model.network_config.params.modules.lora_config.params.r=4",
        "model.network_config.params.modules.lora_config.params.lora_alpha=8"]


def tiny_engine(*overrides) -> VideoDiffusionEngine:
    files = [item for item in overrides if item.endswith(".yaml")]
    settings = [item for item in overrides if not item.endswith(".yaml")]
    engine = VideoDiffusionEngine.from_config(load_config([*TINY, *files], [*STEPS, *settings]).model)
    return engine.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny transformer in the SAT layout, and beside it the VAE every sampling run here uses."""
    torch.manual_seed(0)
    engine = tiny_engine()
    with torch.no_grad():  # random everywhere (zero-initialised modulations would ignore the text)
        for parameter in engine.network.parameters():
            parameter.normal_(0, 0.05)
    folder = save_sat(engine.network.state_dict(), tmp_path_factory.mktemp("base") / "ckpt")
    torch.save({"state_dict": engine.first_stage_model.state_dict()}, folder / "vae.pt")
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, base) -> Path:
    """A satvideo adapter checkpoint over `base`: random LoRA matrices, rank 4, alpha 8."""
    torch.manual_seed(1)
    network = tiny_engine(*LORA).network
    adapters = {key: torch.randn_like(value) * 0.2 for key, value in network.state_dict().items() if "matrix_" in key}
    metadata = {"r": 4, "lora_alpha": 8.0, "target_modules": ["attention.query_key_value", "attention.dense"],
                "base": str(base)}
    return save_sat(adapters, tmp_path_factory.mktemp("adapter") / "ckpt", lora=metadata)


def sample_command(load: Path, out: Path, *overrides) -> list[str]:
    vae = Path(load).parent / "vae.pt" if (Path(load).parent / "vae.pt").is_file() else Path(load) / "vae.pt"
    return [sys.executable, "sample_video.py", "--base", *TINY, "configs/tiny/sample.yaml", *STEPS,
            f"args.load={load}", f"args.output_dir={out}", f"model.first_stage_config.params.ckpt_path={vae}", *overrides]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- outputs -------------------------------------------------------------------------------------------------

def test_a_second_run_never_overwrites_and_a_sidecar_reproduces_its_video(tmp_path, base):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\na blue circle moving up\n")
    out = tmp_path / "out"
    run(sample_command(base, out, f"args.input_file={prompts}", "args.contact_sheet=true"))
    first = {path.name: digest(path) for path in out.iterdir()}
    run(sample_command(base, out, f"args.input_file={prompts}", "args.seed=7"))
    assert all(digest(out / name) == value for name, value in first.items() if name != "manifest.jsonl")
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 4 and {p.name for p in videos} >= {"000_0_a-red-square-moving-left-2.mp4"}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["file"] for line in manifest) == [p.name for p in videos]  # one line per file
    assert (out / "000_0_a-red-square-moving-left.png").is_file()  # contact sheet

    sidecar = json.loads((out / "001_0_a-blue-circle-moving-up-2.json").read_text())
    assert sidecar["seed"] == 8 and sidecar["sampler"] == {"name": "VPSDEDPMPP2MSampler", "num_steps": 3}
    assert sidecar["guidance"]["name"] == "DynamicCFG" and sidecar["frames"] == 9 and sidecar["size"] == [32, 32]
    assert len(sidecar["checkpoint"]["sha256"]) == 64 and sidecar["satvideo_version"] and sidecar["seconds"] > 0
    request = tmp_path / "again.jsonl"
    request.write_text(json.dumps({"prompt": sidecar["prompt"], "seed": sidecar["seed"]}) + "\n")
    run(sample_command(base, tmp_path / "again", f"args.input_file={request}"))
    again, _ = read_mp4(next((tmp_path / "again").glob("*.mp4")))
    original, _ = read_mp4(out / sidecar["file"])
    assert np.array_equal(again, original)


def test_overwrite_replaces_files_and_their_manifest_lines(tmp_path, base):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n")
    out = tmp_path / "out"
    run(sample_command(base, out, f"args.input_file={prompts}"))
    run(sample_command(base, out, f"args.input_file={prompts}", "args.overwrite=true", "args.seed=9"))
    assert [p.name for p in out.glob("*.mp4")] == ["000_0_a-red-square-moving-left.mp4"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(line["file"], line["seed"]) for line in manifest] == [("000_0_a-red-square-moving-left.mp4", 9)]


def test_no_two_videos_of_a_run_share_a_seed(tmp_path):
    from argparse import Namespace

    from satvideo.sampling.inputs import read_requests

    prompts, requests = tmp_path / "prompts.txt", tmp_path / "requests.jsonl"
    prompts.write_text("a\nb\nc\n")
    # null is "not given", as exporters write absent fields
    requests.write_text('{"prompt": "a"}\n{"prompt": "b", "seed": 7}\n'
                        '{"prompt": "c", "seed": null, "image": null, "negative_prompt": null}\n')
    for path, expected in ((prompts, [40, 42, 44]), (requests, [40, 7, 44])):
        args = Namespace(input_file=str(path), seed=40, num_samples=2)
        read = read_requests(args)
        assert [request.seed for request in read] == expected  # videos: seed and seed + 1
        assert read[2].image is None and read[2].negative_prompt == ""


def test_an_mp4_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import imageio_ffmpeg

    frames = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="fps must be positive, got 0"):
        write_mp4(frames, tmp_path / "a.mp4", fps=0)
    assert list(tmp_path.iterdir()) == []
    write_mp4(frames, tmp_path / "a.mp4", fps=8)
    before = digest(tmp_path / "a.mp4")

    def writer_that_fails_midway(path, **options):
        Path(path).write_bytes(b"the first frames")
        yield
        raise OSError("No space left on device")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", writer_that_fails_midway)
    with pytest.raises(OSError, match="No space left"):
        write_mp4(frames + 100, tmp_path / "a.mp4", fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"] and digest(tmp_path / "a.mp4") == before
    assert read_mp4(tmp_path / "a.mp4")[0].shape == (3, 32, 32, 3)


def test_overwriting_keeps_a_damaged_manifest_line_and_replaces_the_files_own(tmp_path):
    from satvideo.sampling.outputs import OutputWriter

    writer = OutputWriter(tmp_path, overwrite=True, contact_sheets=False)
    video = torch.zeros(3, 3, 16, 16)
    writer.write("v", {"prompt": "p", "seed": 1}, video=video)
    with open(tmp_path / "manifest.jsonl", "a") as manifest:
        manifest.write('{"file": "x.mp4", "prompt": "cut by a kil')
    writer.write("v", {"prompt": "p", "seed": 2}, video=video)
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert lines == ['{"file": "x.mp4", "prompt": "cut by a kil', '{"file": "v.mp4", "prompt": "p", "seed": 2}']
    writer.overwrite = False  # appending after a line cut short starts a line of its own
    with open(tmp_path / "manifest.jsonl", "a") as manifest:
        manifest.write('{"file": "y.mp4"')
    writer.write("w", {"prompt": "q", "seed": 3}, video=video)
    assert (tmp_path / "manifest.jsonl").read_text().splitlines()[-2:] == [
        '{"file": "y.mp4"', '{"file": "w.mp4", "prompt": "q", "seed": 3}']
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "v.json", "v.mp4", "w.json", "w.mp4"]


# --- inputs checked before weights load --------------------------------------------------------------------

def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    empty, latin1, bad_json, video = (tmp_path / "empty.txt", tmp_path / "latin1.txt", tmp_path / "bad.jsonl",
                                      tmp_path / "clip.jsonl")
    empty.write_text("# only a comment\n")
    latin1.write_bytes("une vid\xe9o\n".encode("latin-1"))
    bad_json.write_text('{"prompt": "a cat", "sed": 3}\n')
    video.write_text(json.dumps({"prompt": "a cat", "video": str(tmp_path / "missing.mp4"), "strength": 0.5}) + "\n")
    (tmp_path / "file").write_text("")
    frames = tmp_path / "frames.jsonl"
    frames.write_text('{"prompt": "a cat", "num_frames": 12}\n')
    text_seed = tmp_path / "seed.jsonl"
    text_seed.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": "abc"}\n')
    last_seed = tmp_path / "last_seed.jsonl"
    last_seed.write_text(f'{{"prompt": "a cat", "seed": {2**63 - 1}}}\n')
    no_t5 = ("model.conditioner_config.params.emb_models=[{target: sgm.modules.encoders.modules.FrozenT5Embedder, "
             f"params: {{model_dir: {tmp_path / 'no_t5'}}}}}]")
    return [
        ([f"args.input_file={frames}"], 'frames.jsonl:1: "num_frames": 12: expected 4k+1 frames for the causal VAE'),
        ([f"args.input_file={last_seed}", "args.num_samples=2"],
         f'last_seed.jsonl:1: "seed": {2**63 - 1}: its 2 videos (args.num_samples) would take seeds up to {2**63}'),
        (["model.sampler_config.params.guider_config.params.scale=.nan"],
         "model.sampler_config.params.guider_config.params.scale=nan: expected a finite number"),
        (["model.sampler_config.params.guider_config.params.scale=nan"],
         "model.sampler_config.params.guider_config.params.scale='nan': expected a finite number"),
        (["model.sampler_config.params.num_steps=0", "model.sampler_config.params.guider_config.params.num_steps=0"],
         "model.sampler_config.params.num_steps=0: expected a whole number from 1 to 1000"),
        ([no_t5], "no_t5' is not a directory"),
        ([f"args.input_file={empty}"], "holds no prompt"),
        ([f"args.input_file={latin1}"], "is not UTF-8 text"),
        ([f"args.input_file={bad_json}"], "unknown key 'sed'; did you mean 'seed'?"),
        ([f"args.input_file={text_seed}"], "seed.jsonl:2: \"seed\": \"abc\": expected a whole number"),
        ([f"args.input_file={tmp_path}"], "is a folder, not a file"),
        (["args.sampling_fps=-3"], "args.sampling_fps=-3: expected a number > 0"),
        ([f"args.input_file={video}"], "missing.mp4 cannot be decoded"),
        (["args.sampling_num_frames=4"], "13 output frames (4 latent); this family needs 8N+1 frames"),
        (["args.sampling_num_frames=0"], "args.sampling_num_frames=0: expected a whole number >= 1"),
        (["args.sampling_image_size=[40,40]"], "both must be multiples of 16"),
        (["args.decode_chunk_frames=3"], "args.decode_chunk_frames must be a positive multiple of 2, got 3"),
        (["args.vae_tiling=2", "args.vae_tile_overlap=-1"], "args.vae_tiling=2 with args.vae_tile_overlap=-1"),
        (["args.image2video=true"], "args.image2video needs an image"),
        ([f"args.output_dir={tmp_path / 'file' / 'out'}"], "not writable"),
        ([f"args.load={tmp_path / 'nowhere'}"], "does not exist"),
    ]


def test_a_typed_line_that_fails_its_check_is_refused_and_the_session_goes_on(tmp_path, base):
    output = run(sample_command(base, tmp_path / "out", "args.input_type=cli"),
                 stdin="a red square@@frame.png\na red square moving left\n\n")
    assert ("error: request 0 ('a red square'): an image is given but args.image2video is false (a text-to-video "
            "model)") in output
    assert [json.loads(line)["prompt"] for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()] \
        == ["a red square moving left"]


def test_latents_or_videos_that_are_not_finite_name_their_request_and_are_not_written():
    from satvideo.config import SatvideoError
    from satvideo.sampling import VideoRequest

    check_finite = runpy.run_path(str(Path(ROOT) / "sample_video.py"))["check_finite"]
    group = [VideoRequest(index=4, prompt="a cat", seed=0), VideoRequest(index=5, prompt="a dog", seed=0)]
    latents = torch.zeros(4, 3, 16, 4, 4)  # 2 requests x 2 samples
    assert check_finite(latents, group, 2, "sampled latents") is latents
    latents[3, 1, 0, 2, 2] = float("nan")
    with pytest.raises(SatvideoError, match=r"^request 5 \('a dog'\): the sampled latents hold NaN or inf \(an "
                                            r"overflow in half precision\?\); nothing was written for it$"):
        check_finite(latents, group, 2, "sampled latents")


def sample_in_this_process(command: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python sample_video.py ...` run as __main__ in this process, for inputs refused
    before a process group or a model is built (a process start costs seconds of imports)."""
    monkeypatch.setattr(sys, "argv", command[1:])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit:  # anything but satvideo's one-line exit propagates and fails the test
        runpy.run_path(str(Path(ROOT) / "sample_video.py"), run_name="__main__")
    return exit.value.code, capsys.readouterr().err


def test_each_bad_input_fails_before_weights_load_with_one_line(tmp_path, base, monkeypatch, capsys, caplog):
    for overrides, message in bad_inputs(tmp_path):
        command = sample_command(base, tmp_path / "out", "args.input_file=configs/tiny/prompts.txt", *overrides)
        caplog.clear()
        if "no_t5" in message or "model.sampler_config" in message:  # as a real process (found as the model is
            result = failing(command)                                 # built, still before any weight loads)
            code, stderr = result.returncode, result.stderr
        else:
            code, stderr = sample_in_this_process(command, monkeypatch, capsys)
        last = stderr.strip().splitlines()[-1]
        assert code == 2 and message in last and last.startswith("error: "), (overrides, last)
        assert "Traceback" not in stderr, overrides
        if "no_t5" not in message:
            assert "network parameters" not in stderr + caplog.text, overrides
    assert not (tmp_path / "out").exists()  # the output folder comes with the first video


# --- negative prompts, video-to-video, continuation -----------------------------------------------------------

def loaded(base: Path, *overrides) -> VideoDiffusionEngine:
    from satvideo.checkpoint import load_network

    engine = tiny_engine(f"model.first_stage_config.params.ckpt_path={base / 'vae.pt'}", *overrides)
    load_network(engine.network, base)
    return engine


@pytest.mark.parametrize("guider", ["dynamic", "vanilla"])
def test_a_negative_prompt_is_the_unconditional_text(base, guider):
    engine = loaded(base)
    if guider == "vanilla":
        engine.sampler.guider = VanillaCFG(scale=6.0)
    shape, prompt = (3, 16, 4, 4), ["a red square moving left"]
    plain = engine.sample(prompt, shape, torch.Generator().manual_seed(3))
    negative = engine.sample(prompt, shape, torch.Generator().manual_seed(3), negative_prompts=["a blue circle"])
    cond = engine.conditioner({"txt": prompt})
    by_hand = engine.sample(prompt, shape, torch.Generator().manual_seed(3),
                            text=(cond, engine.conditioner({"txt": ["a blue circle"]})))
    assert not torch.allclose(plain, negative) and torch.equal(negative, by_hand)


def test_video_to_video_ends_and_continuation(base):
    engine = loaded(base)
    shape, prompt = (3, 16, 4, 4), ["a red square moving left"]
    clip = torch.rand(1, 9, 3, 32, 32) * 2 - 1
    init = engine.encode_first_stage(clip, sample=False)
    assert torch.equal(engine.sample(prompt, shape, torch.Generator().manual_seed(5), init_latents=init,
                                     strength=0.0), init)  # strength 0: the input's latents (its reconstruction)
    t2v = engine.sample(prompt, shape, torch.Generator().manual_seed(5))
    v2v = engine.sample(prompt, shape, torch.Generator().manual_seed(5), init_latents=init, strength=1.0)
    assert torch.equal(t2v, v2v)  # strength 1: pure noise at zero terminal SNR, the text-to-video run
    halfway = engine.sample(prompt, shape, torch.Generator().manual_seed(5), init_latents=init, strength=0.5)
    assert (halfway - init).abs().mean() < (t2v - init).abs().mean()
    continued = engine.sample(prompt, shape, torch.Generator().manual_seed(5), prefix_latents=init[:, :2])
    assert torch.equal(continued[:, :2], init[:, :2]) and not torch.equal(continued[:, 2:], init[:, 2:])


def test_video_to_video_and_continuation_from_jsonl(tmp_path, base):
    make_toy_dataset(tmp_path / "toy", num=1, size=32, frames=17, fps=8)
    clip = next((tmp_path / "toy" / "videos").glob("*.mp4"))
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "a red square", "video": str(clip), "strength": 0.6}) + "\n" +
                        json.dumps({"prompt": "a red square", "video": str(clip), "continue_frames": 1,
                                    "negative_prompt": "blurry"}) + "\n")
    run(sample_command(base, tmp_path / "out", f"args.input_file={requests}", "args.vae_tiling=2",
                       "args.vae_tile_overlap=1"))  # decoded in 2x2-latent tiles
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*.json"))]
    assert [(s["mode"], s["negative_prompt"]) for s in sidecars] == [("video-to-video", ""), ("continuation", "blurry")]
    assert all(read_mp4(tmp_path / "out" / s["file"])[0].shape == (9, 32, 32, 3) for s in sidecars)


# --- adapters ------------------------------------------------------------------------------------------------

def test_merged_adapters_equal_the_adapter_over_base_and_a_peft_export_loads_back(tmp_path, base, adapter):
    from satvideo.checkpoint import load_network
    from satvideo.convert.checkpoints import sat_lora_to_diffusers_checkpoint

    shape, prompt = (3, 16, 4, 4), ["a red square moving left"]
    over_base = tiny_engine(f"model.first_stage_config.params.ckpt_path={base / 'vae.pt'}", *LORA)
    load_network(over_base.network, adapter)
    expected = over_base.sample(prompt, shape, torch.Generator().manual_seed(2))

    merged = loaded(base)
    merge_adapters(merged.network, [(str(adapter), 1.0)])
    got = merged.sample(prompt, shape, torch.Generator().manual_seed(2))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    sat_lora_to_diffusers_checkpoint(adapter, tmp_path / "peft")  # alpha from the checkpoint
    from_peft = loaded(base)
    merge_adapters(from_peft.network, [(str(tmp_path / "peft"), 1.0)])
    assert (from_peft.sample(prompt, shape, torch.Generator().manual_seed(2)) - expected).abs().max() \
        <= 1e-5 * expected.abs().max()

    half = loaded(base)
    merge_adapters(half.network, [(str(adapter), 0.5), (str(tmp_path / "peft"), 0.5)])  # two adapters, scales
    assert (half.sample(prompt, shape, torch.Generator().manual_seed(2)) - expected).abs().max() \
        <= 1e-5 * expected.abs().max()


def test_lora_merge_writes_a_plain_checkpoint_that_samples_as_the_adapters_over_their_base(tmp_path, base, adapter):
    from satvideo.checkpoint import load_network, network_state_dict, scale_lora
    from satvideo.sampling.adapters import write_merged_checkpoint

    shape, prompt = (3, 16, 4, 4), ["a red square moving left"]
    vae = f"model.first_stage_config.params.ckpt_path={base / 'vae.pt'}"
    over_base = tiny_engine(vae, *LORA)
    load_network(over_base.network, adapter)
    expected = over_base.sample(prompt, shape, torch.Generator().manual_seed(2))
    run([sys.executable, "scripts/convert_weights.py", "lora-merge", "--checkpoint", str(adapter), "--out",
         str(tmp_path / "merged")])
    assert not any("matrix_" in key or ".original." in key for key in network_state_dict(tmp_path / "merged"))
    got = loaded(tmp_path / "merged", vae).sample(prompt, shape, torch.Generator().manual_seed(2))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()

    # SAT's own LoRA layout (base weights as `original.weight`, no record: SAT's alpha 1), at half strength
    official = tiny_engine(vae, "configs/lora.yaml", "model.network_config.params.modules.lora_config.params.r=4")
    load_network(official.network, base)
    with torch.no_grad():
        for name, value in official.network.named_parameters():
            if "matrix_B" in name:
                value.normal_(0, 2.0)
    full = save_sat(official.network.state_dict(), tmp_path / "official")
    scale_lora(official.network, 0.5)
    expected = official.sample(prompt, shape, torch.Generator().manual_seed(2))
    write_merged_checkpoint(str(full), tmp_path / "official_merged", scale=0.5)
    got = loaded(tmp_path / "official_merged", vae).sample(prompt, shape, torch.Generator().manual_seed(2))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.equal(got, loaded(base, vae).sample(prompt, shape, torch.Generator().manual_seed(2)))


def test_a_peft_file_is_scaled_by_the_alpha_and_rank_diffusers_records_in_its_header(tmp_path, adapter):
    from safetensors.torch import save_file

    from satvideo.checkpoint import network_state_dict
    from satvideo.convert.lora import sat_lora_to_peft
    from satvideo.sampling.adapters import adapter_deltas

    expected = adapter_deltas(str(adapter))  # rank 4, alpha 8: B @ A * 2
    raw = sat_lora_to_peft(network_state_dict(adapter), lora_alpha=4.0)  # B @ A as trained, scale 1 folded in

    def peft(name: str, header: dict | None) -> str:
        metadata = None if header is None else {"lora_adapter_metadata": json.dumps(header)}
        save_file(raw, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        return str(tmp_path / f"{name}.safetensors")

    def scaled_by(path: str) -> float:
        deltas = adapter_deltas(path)
        assert deltas.keys() == expected.keys()
        ratios = [deltas[key].norm() / expected[key].norm() * 2 for key in expected]
        assert max(ratios) - min(ratios) < 1e-5
        return float(ratios[0])

    assert scaled_by(peft("no_header", None)) == pytest.approx(1.0)  # diffusers applies a headerless file at 1
    assert scaled_by(peft("alpha_8", {"transformer.r": 4, "transformer.lora_alpha": 8})) == pytest.approx(2.0)
    assert scaled_by(peft("rslora", {"transformer.r": 4, "transformer.lora_alpha": 8,
                                     "transformer.use_rslora": True})) == pytest.approx(4.0)
    assert scaled_by(peft("text_encoder_only", {"text_encoder.r": 4, "text_encoder.lora_alpha": 8})) == \
        pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"^args.lora: .*pattern.safetensors: its header's lora_adapter_metadata "
                                          r"gives per-module ranks or alphas, or DoRA: args.lora merges plain LoRA "
                                          r"only$"):
        adapter_deltas(peft("pattern", {"transformer.r": 4, "transformer.rank_pattern": {"to_q": 8}}))
    with pytest.raises(ConfigError, match=r"gives r=0 and lora_alpha=8: expected numbers > 0$"):
        adapter_deltas(peft("rank_0", {"transformer.r": 0, "transformer.lora_alpha": 8}))


def test_args_lora_merges_at_sampling(tmp_path, base, adapter):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n")
    run(sample_command(base, tmp_path / "out", f"args.input_file={prompts}", f"args.lora=[{adapter}]"))
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["adapters"] == [{"path": str(adapter), "scale": 1.0}]
    result = failing(sample_command(base, tmp_path / "out", f"args.input_file={prompts}",
                                    f"args.lora=[{tmp_path / 'missing'}]"))
    assert result.returncode == 2 and "args.lora: adapter" in result.stderr.strip().splitlines()[-1]


def test_adapters_whose_recorded_base_has_moved_say_so_before_the_model_is_built(tmp_path, base, adapter,
                                                                                 monkeypatch, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    recorded = tmp_path / "base_was_here"
    state = torch.load(moved / "1" / MODEL_STATES, weights_only=True)
    state["lora"]["base"] = str(recorded)
    torch.save(state, moved / "1" / MODEL_STATES)
    command = sample_command(moved, tmp_path / "out", "args.input_file=configs/tiny/prompts.txt")
    code, stderr = sample_in_this_process(command, monkeypatch, capsys)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {moved / '1' / MODEL_STATES} holds LoRA adapters only, and the base its adapters record, {recorded}, "
        "does not exist: set args.lora_base to where that checkpoint is now")
    code, stderr = sample_in_this_process([*command, f"args.lora_base={tmp_path / 'nowhere'}"], monkeypatch, capsys)
    assert code == 2 and stderr.strip().endswith(f"and args.lora_base={tmp_path / 'nowhere'} does not exist")


def test_args_lora_over_a_model_with_lora_layers_says_how_to_merge_them_first(base, adapter):
    over_base = tiny_engine(f"model.first_stage_config.params.ckpt_path={base / 'vae.pt'}", *LORA)
    with pytest.raises(ConfigError, match=r"^args.lora merges adapters into plain weights, and this model has LoRA "
                                          r"layers \(from configs/lora.yaml, or for the adapters args.load holds\): "
                                          r"leave configs/lora.yaml out, or merge args.load's adapters first "
                                          r"\(scripts/convert_weights.py lora-merge\)$"):
        merge_adapters(over_base.network, [(str(adapter), 1.0)])


def test_a_sidecar_of_adapters_names_the_base_they_were_loaded_over(tmp_path, base, adapter):
    from satvideo.checkpoint import resolve_model_states

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n")
    run(sample_command(adapter, tmp_path / "out", f"args.input_file={prompts}", "args.only_save_latents=true",
                       f"model.first_stage_config.params.ckpt_path={base / 'vae.pt'}"))
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["decode"] == {"chunk_frames": "original", "tiling": None, "tile_overlap": 8}
    record = sidecar["checkpoint"]
    base_file = resolve_model_states(base)
    assert record["path"] == str(adapter / "1" / MODEL_STATES)
    assert record["base"] == {"path": str(base_file), "sha256": digest(base_file), "lora_scale": 1.0}


@pytest.mark.parametrize("value, message", [
    ([{"path": "configs", "scale": "abc"}], "args.lora[0].scale='abc': expected a finite number"),
    ([{"path": "configs", "scale": [1, 2]}], "args.lora[0].scale=[1, 2]: expected a finite number"),
    ([{"path": "configs", "scale": float("inf")}], "args.lora[0].scale=inf: expected a finite number"),
    ([{"path": "configs", "scael": 2}], "args.lora[0]: unknown key 'scael'; an adapter is {path, scale}"),
    (["configs", 5], "args.lora[1]=5: expected a path or {path: ..., scale: ...}"),
])
def test_args_lora_entries_are_checked(value, message):
    from omegaconf import OmegaConf

    from satvideo.sampling.adapters import adapter_list

    with pytest.raises(ConfigError) as error:
        adapter_list(OmegaConf.create({"lora": value}).lora)
    assert str(error.value) == message


def test_the_scale_of_the_adapters_of_args_load_is_finite():
    with pytest.raises(ConfigError, match=r"^args.lora_scale=nan: expected a finite number$"):
        load_config(TINY, ["args.lora_scale=.nan"])


def test_peft_files_that_cannot_be_merged_are_one_line_and_a_partial_one_changes_only_its_rows(tmp_path, base):
    from safetensors.torch import save_file

    from satvideo.sampling.adapters import adapter_deltas

    prefix = "transformer.transformer_blocks.0.attn1"
    hidden = tiny_engine().network.transformer.layers[0].attention.dense.weight.shape[0]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"damaged.safetensors is not a readable safetensors file"):
        adapter_deltas(str(damaged))
    half = tmp_path / "half.safetensors"
    save_file({f"{prefix}.to_q.lora_A.weight": torch.ones(2, hidden)}, str(half))
    with pytest.raises(ConfigError, match=r"half.safetensors: layer 0 query_key_value partition 0 needs a pair A \[r, "
                                          rf"in\] and B \[out, r\]; found A \[2, {hidden}\]$"):
        adapter_deltas(str(half))
    ranks = tmp_path / "ranks.safetensors"
    save_file({f"{prefix}.to_q.lora_A.weight": torch.ones(2, hidden),
               f"{prefix}.to_q.lora_B.weight": torch.ones(hidden, 3)}, str(ranks))
    with pytest.raises(ConfigError, match=r"found A \[2, \d+\], B \[\d+, 3\]$"):
        adapter_deltas(str(ranks))
    flat = tmp_path / "flat.safetensors"
    save_file({f"{prefix}.to_q.lora_A.weight": torch.ones(2, hidden), f"{prefix}.to_q.lora_B.weight": torch.ones(2)},
              str(flat))
    with pytest.raises(ConfigError, match=r"found A \[2, \d+\], B \[2\]$"):
        adapter_deltas(str(flat))
    only_v = tmp_path / "only_v.safetensors"  # an adapter of to_v alone: the q and k rows stay as they are
    a, b = torch.randn(2, hidden), torch.randn(hidden, 2)
    save_file({f"{prefix}.to_v.lora_A.weight": a, f"{prefix}.to_v.lora_B.weight": b}, str(only_v))
    merged, plain = loaded(base), loaded(base)
    merge_adapters(merged.network, [(str(only_v), 0.5)])
    name = "transformer.layers.0.attention.query_key_value.weight"
    change = dict(merged.network.named_parameters())[name] - dict(plain.network.named_parameters())[name]
    assert torch.equal(change[: 2 * hidden], torch.zeros(2 * hidden, hidden))
    assert torch.allclose(change[2 * hidden :], 0.5 * b @ a, atol=1e-6)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from satvideo.sampling.inputs import read_jsonl_requests, read_prompts

    prompts, requests = tmp_path / "prompts.txt", tmp_path / "requests.jsonl"
    prompts.write_bytes(b"\xef\xbb\xbfa red square moving left\na blue circle\n")
    requests.write_bytes(b'\xef\xbb\xbf{"prompt": "a red square moving left"}\n')
    assert read_prompts(str(prompts)) == ["a red square moving left", "a blue circle"]
    assert [request.prompt for request in read_jsonl_requests(str(requests), seed=0)] == ["a red square moving left"]
