"""The latent cache (satvideo/data/cache.py, scripts/precompute.py): shards from every torchrun rank and a manifest
written last; training from it loses exactly what training from the videos loses, without building T5 or the VAE;
stale, unfinished and mixed caches."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bad_dataset import BAD_SAMPLES, make_bad_dataset
from conftest import one_line_error, script_error
from satvideo.config import ConfigError, args_namespace, instantiate_from_config, load_config
from satvideo.data import CachedDataset
from satvideo.data.cache import BLOCK, MANIFEST, check_caches, file_fingerprint
from satvideo.data.health import REASONS
from satvideo.data.sources import bucket_groups, build_dataset
from satvideo.data.toy import make_toy_dataset
from test_data_sources import BUCKETS, wide_clips
from test_i2v_data import I2V
from test_training import ROOT, TINY, metrics, run, train

PARAMS = dict(video_size=[32, 32], fps=8, max_num_frames=9, skip_frms_num=0)  # configs/tiny/train.yaml's
FROM_CACHE = "data.target=satvideo.data.CachedDataset"
POSTERIOR_MEAN = "model.first_stage_config.params.regularizer_config.params.sample=false"
BUILT_FROZEN_PARTS = "built the frozen parts"  # engine.build_frozen_parts, the one place T5 and the VAE are built
NOT_BUILT = "training from a latent cache: neither T5 nor the VAE is built"


def precompute(out: Path, *overrides: str, nproc: int = 1, clips_per_shard: int = 256) -> str:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return run(launcher + ["scripts/precompute.py", "--out", str(out), "--clips-per-shard", str(clips_per_shard),
                           "--base", *TINY, *overrides])


def assert_same_losses(live: Path, cached: Path) -> None:
    """The run from the cache logged the losses of the run from the videos: 4 training, 2 validation."""
    for key, count in (("loss", 4), ("valid_loss", 2)):
        expected = [record[key] for record in metrics(live) if key in record]
        got = [record[key] for record in metrics(cached) if key in record]
        assert len(got) == count and got == pytest.approx(expected, rel=1e-5), key


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy")
    make_toy_dataset(folder, num=16, size=32, frames=9, fps=8, seed=0)
    return folder


@pytest.fixture(scope="module")
def sharded_cache(tmp_path_factory, toy_data) -> tuple[Path, str]:
    """A cache of the 16 toy clips made by two ranks, 3 clips per shard, and the precompute's output."""
    out = tmp_path_factory.mktemp("cache") / "toy_cache"
    output = precompute(out, f"args.train_data=[{toy_data}]", nproc=2, clips_per_shard=3)
    return out, output


@pytest.mark.slow
def test_two_ranks_write_shards_and_training_from_them_loses_what_training_from_the_videos_loses(
        tmp_path, toy_data, sharded_cache):
    cache, output = sharded_cache
    shards = sorted(path.name for path in cache.glob("shard-*.safetensors"))
    assert shards == [f"shard-{rank:03d}-{n:05d}.safetensors" for rank in (0, 1) for n in range(3)]  # 8 clips each
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["count"] == 16 and manifest["shards"] == shards and manifest["text_widths"] == [32]
    assert [clip["key"] for clip in manifest["clips"]] == [str(i) for i in range(16)]  # in sample order
    assert {manifest["shards"][clip["shard"]][:9] for clip in manifest["clips"][1::2]} == {"shard-001"}
    assert all(clip["latent_shape"] == [16, 3, 4, 4] for clip in manifest["clips"])
    assert "cached 16 clips" in output and "6 shards by 2 rank(s)" in output
    assert "stood in for by a clip of its source: 0 (none)" in output

    common = ("args.train_iters=4", "args.log_interval=1", "args.save_interval=1000", "args.batch_size=2",
              "args.eval_interval=2", "args.eval_iters=2", POSTERIOR_MEAN)
    live = train(tmp_path / "live", toy_data, *common, f"args.valid_data=[{toy_data}]")
    cached = train(tmp_path / "cached", cache, *common, f"args.valid_data=[{cache}]", FROM_CACHE)
    assert BUILT_FROZEN_PARTS in live and NOT_BUILT not in live
    assert BUILT_FROZEN_PARTS not in cached and NOT_BUILT in cached
    assert_same_losses(tmp_path / "live", tmp_path / "cached")


@pytest.mark.slow
def test_validation_videos_build_t5_and_the_vae_for_a_run_from_the_cache_and_say_so(tmp_path, sharded_cache):
    cache, _ = sharded_cache
    output = train(tmp_path / "run", cache, FROM_CACHE, "args.train_iters=2", "args.eval_interval=2",
                   "args.validation_prompts=[a red square moving left]", "model.sampler_config.params.num_steps=2",
                   "model.sampler_config.params.guider_config.params.num_steps=2")
    assert "validation videos (args.validation_prompts) need T5 and the VAE decoder" in output
    assert BUILT_FROZEN_PARTS in output
    assert len(list((tmp_path / "run" / "validation" / "0000002").glob("*.mp4"))) == 1


def test_a_stale_data_param_is_refused_naming_it(sharded_cache):
    cache, _ = sharded_cache
    assert len(CachedDataset(str(cache), **PARAMS)) == 16
    assert len(CachedDataset(str(cache), **PARAMS, frame_sampling="stride")) == 16  # the default, written out
    with pytest.raises(ConfigError, match=rf"^the cache {cache} was made with data.params.fps=8, the config says 16: "
                                          r"make it again with scripts/precompute.py$"):
        CachedDataset(str(cache), **{**PARAMS, "fps": 16})
    with pytest.raises(ConfigError, match=r"data.params.frame_sampling='stride', the config says 'fps'"):
        CachedDataset(str(cache), **PARAMS, frame_sampling="fps")
    with pytest.raises(ConfigError, match=r"unknown key data.params.fsp; did you mean data.params.fps\?"):
        CachedDataset(str(cache), **PARAMS, fsp=8)


def test_an_unfinished_cache_is_refused_in_one_line(tmp_path, sharded_cache):
    cache, _ = sharded_cache
    interrupted = tmp_path / "interrupted"
    shutil.copytree(cache, interrupted)
    (interrupted / MANIFEST).unlink()  # what a precompute stopped before its last barrier leaves
    result = subprocess.run([sys.executable, "train_video.py", "--base", *TINY, FROM_CACHE,
                             f"args.train_data=[{interrupted}]", "args.num_workers=0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: args.train_data {interrupted}: the cache {interrupted} has 6 shards but no cache.json: its "
        "precompute did not finish; make it again with scripts/precompute.py")
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is not a cache \(no cache.json\)"):
        CachedDataset(str(tmp_path), **PARAMS)

    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    shard = sorted(damaged.glob("shard-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ConfigError, match=rf"^the cache {damaged}: shard {shard.name} is damaged \(.*\): make it "
                                          "again with scripts/precompute.py"):
        CachedDataset(str(damaged), **PARAMS)


def test_a_damaged_manifest_is_refused_in_one_line(tmp_path, sharded_cache):
    cache, _ = sharded_cache
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    text = (damaged / MANIFEST).read_text()
    manifest = json.loads(text)
    remake = "make it again with scripts/precompute.py"
    for contents, problem in [
        (text[: len(text) // 2], rf"{MANIFEST} cannot be read \(.*\): {remake}$"),
        ("[1, 2]", f"{MANIFEST} holds no manifest: {remake}$"),
        (json.dumps({k: v for k, v in manifest.items() if k not in ("clips", "sources")}),
         f"{MANIFEST} lacks clips, sources: {remake}$"),
    ]:
        (damaged / MANIFEST).write_text(contents)
        with pytest.raises(ConfigError, match=rf"^the cache {damaged}: {problem}"):
            CachedDataset(str(damaged), **PARAMS)


def test_a_bad_encode_chunk_frames_stops_precompute_before_it_clears_the_old_cache(tmp_path, toy_data, sharded_cache):
    cache, _ = sharded_cache
    previous = tmp_path / "previous"
    shutil.copytree(cache, previous)
    result = run_precompute(previous, f"args.train_data=[{toy_data}]", "model.encode_chunk_frames=6", "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: model.encode_chunk_frames must be a positive multiple " \
                                                     "of 4, got 6"
    assert (previous / MANIFEST).read_text() == (cache / MANIFEST).read_text()
    assert len(CachedDataset(str(previous), **PARAMS)) == 16


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory) -> dict:
    """A cache of a folder with 3 good clips and one bad clip of each kind, mixed 1:2 with 2 clean clips, made
    with a VAE checkpoint file."""
    folder = tmp_path_factory.mktemp("mixed")
    bad, clean = make_bad_dataset(folder / "bad", good=3), folder / "clean"
    make_toy_dataset(clean, num=2, size=32, frames=9, fps=8, seed=1)
    torch.manual_seed(0)
    vae = instantiate_from_config(load_config(TINY).model.first_stage_config)
    vae_file = folder / "vae.pt"
    torch.save({"state_dict": vae.state_dict()}, vae_file)
    overrides = [f"args.train_data=[{bad},{clean}]", "args.train_data_weights=[1,2]",
                 f"model.first_stage_config.params.ckpt_path={vae_file}", "data.max_bad_share=1"]
    output = precompute(folder / "cache", *overrides)
    return {"cache": folder / "cache", "output": output, "vae": vae, "vae_file": vae_file, "overrides": overrides}


def test_a_cache_mixes_sources_with_bad_clips_exactly_as_the_videos_are_mixed(mixed_cache):
    reasons = sorted(set(BAD_SAMPLES.values()), key=list(REASONS).index)
    assert (f"cached 5 clips in {mixed_cache['cache']} (1 shards by 1 rank(s)" in mixed_cache["output"]
            and f"a clip of its source: 8 ({', '.join(f'{reason} 1' for reason in reasons)})" in mixed_cache["output"])
    manifest = json.loads((mixed_cache["cache"] / MANIFEST).read_text())
    assert manifest["count"] == 5 and [(s["start"], s["end"], s["weight"], s["bad"]) for s in manifest["sources"]] == [
        (0, 11, 1.0, 8), (11, 13, 2.0, 0)]  # a row per sample: the 8 bad ones name their stand-ins
    cached = CachedDataset(str(mixed_cache["cache"]), **PARAMS)
    config = load_config(TINY, mixed_cache["overrides"])
    args = args_namespace(config)
    videos = build_dataset(config, args.train_data, "args.train_data", args.train_data_weights)
    assert len(cached) == len(videos) == 11 + 2 * 2  # int(samples * weight) slots per source, bad samples included
    assert [cached[index]["txt"] for index in range(len(cached))] == [videos[index]["txt"]
                                                                       for index in range(len(videos))]


def judge(good: int, bad: dict, max_bad_share, sources: list[tuple[int, float, int]], unusable=()) -> None:
    """precompute's check of a manifest with `sources` given as (samples, weight, bad draws in an epoch)."""
    import runpy

    from satvideo.training.guards import BadDataGuard

    check_bad_share = runpy.run_path(str(Path(ROOT) / "scripts" / "precompute.py"))["check_bad_share"]
    rows = [{"draws": int(samples * weight), "bad_draws": count} for samples, weight, count in sources]
    check_bad_share({"count": good, "skipped": bad, "sources": rows, "unusable": list(unusable)},
                    BadDataGuard(max_bad_share), "cache/")


def test_precompute_stops_as_training_would_on_no_clip_or_too_many_bad_draws():
    from satvideo.config import SatvideoError

    judge(95, {"empty_file": 5}, 0.05, [(100, 1.0, 5)])  # at the limit, not above
    judge(18, {"empty_file": 2}, 0.05, [(20, 1.0, 2)])  # judged over at least 100 draws, as training judges
    with pytest.raises(SatvideoError, match=r"^precompute \(94 clips encoded, not written to cache/\): an epoch of "
                                            r"the mixture draws 100 samples, 6 of them bad \(6.0%, above "
                                            r"data.max_bad_share=0.05\): empty_file 6"):
        judge(94, {"empty_file": 6}, 0.05, [(100, 1.0, 6)])
    # 3 bad of 100 distinct samples, but the source holding them draws 10 times as often: 30 of 190 draws
    with pytest.raises(SatvideoError, match=r"draws 190 samples, 30 of them bad \(15.8%"):
        judge(97, {"empty_file": 3}, 0.05, [(90, 1.0, 0), (10, 10.0, 30)])
    with pytest.raises(SatvideoError, match=r"^precompute \(3 clips encoded, not written to cache/\): no clip of its "
                                            r"source and shape can stand in for 2 samples, the first a.mp4 of shape "
                                            r"\[9, 32, 64\] \(empty_caption 2\)"):
        judge(3, {"empty_caption": 2}, 1.0, [(3, 1.0, 0)], ["a.mp4 of shape [9, 32, 64]", "b.mp4 of shape [9, 32, 64]"])
    with pytest.raises(SatvideoError, match=r"^no clip of args.train_data could be cached \(missing_caption 8\)"):
        judge(0, {"missing_caption": 8}, 1.0, [])
    with pytest.raises(SatvideoError, match=r"^data.max_bad_share='abc': expected a share between 0 and 1"):
        judge(8, {}, "abc", [(8, 1.0, 0)])


def test_bad_draws_are_counted_over_the_samples_an_epoch_draws(tmp_path, toy_data):
    from satvideo.data.health import SKIPPED

    bad = make_bad_dataset(tmp_path / "bad", good=3)  # 00000..00002, then the 8 bad ones
    overrides = [f"args.train_data=[{bad},{toy_data}]", "args.train_data_weights=[0.5,1]", "data.max_bad_share=1"]
    precompute(tmp_path / "cache", *overrides)
    source = json.loads((tmp_path / "cache" / MANIFEST).read_text())["sources"][0]
    config = load_config(TINY, overrides)
    args = args_namespace(config)
    videos = build_dataset(config, args.train_data, "args.train_data", args.train_data_weights)
    drawn = [int(videos[index][SKIPPED].sum()) for index in range(int(11 * 0.5))]  # the half of `bad` an epoch draws
    assert sum(drawn) == 2 and (source["bad"], source["draws"], source["bad_draws"]) == (8, 5, 2)


def test_precompute_refuses_what_training_from_the_videos_refuses(tmp_path, toy_data):
    toy2 = tmp_path / "toy2"
    make_toy_dataset(toy2, num=3, size=32, frames=9, fps=8, seed=1)
    assert one_line_error(run_precompute(tmp_path / "c1", f"args.train_data=[{toy_data},{toy2}]",
                                         "args.train_data_weights=[1,0.2]")) == (
        f"error: args.train_data_weights: {toy2} holds 3 samples, which at weight 0.2 take no slot of the mixture "
        "(int(samples * weight) = 0); raise its weight")
    unusable = tmp_path / "unusable"  # a source none of whose clips can be used
    bad = make_bad_dataset(tmp_path / "bad", good=1)
    (unusable / "videos").mkdir(parents=True)
    (unusable / "labels").mkdir()
    for stem in ("bad_zero_bytes", "bad_text"):
        shutil.copy(bad / "videos" / f"{stem}.mp4", unusable / "videos")
        shutil.copy(bad / "labels" / f"{stem}.txt", unusable / "labels")
    error = one_line_error(run_precompute(tmp_path / "c2", f"args.train_data=[{toy_data},{unusable}]",
                                          "data.max_bad_share=1"))
    assert error.startswith(f"error: precompute (16 clips encoded, not written to {tmp_path / 'c2'}): no clip of its "
                            "source and shape can stand in for 2 samples, the first ")
    assert not (tmp_path / "c2").exists()


def run_precompute(out: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/precompute.py", "--out", str(out), "--base", *TINY, *arguments],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_earlier_cache_survives_a_precompute_that_fails_and_is_replaced_only_when_asked(tmp_path, toy_data,
                                                                                           sharded_cache):
    cache, _ = sharded_cache
    previous = tmp_path / "previous"
    shutil.copytree(cache, previous)
    files = {path.name: path.read_bytes() for path in previous.iterdir()}
    data = f"args.train_data=[{toy_data}]"
    assert script_error("precompute.py", "--out", str(previous), "--base", *TINY, data) == (
        f"--out {previous} exists and is not empty; choose another folder or pass --overwrite")
    bad = make_bad_dataset(tmp_path / "bad", good=1)
    assert one_line_error(run_precompute(previous, f"args.train_data=[{bad}]", "--overwrite")).startswith(
        f"error: precompute (1 clips encoded, not written to {previous}): an epoch of the mixture draws 9 samples, 8 "
        "of them bad")
    nan_vae = tmp_path / "nan_vae.pt"
    vae = instantiate_from_config(load_config(TINY).model.first_stage_config)
    torch.save({"state_dict": {key: torch.full_like(value, float("nan")) for key, value in vae.state_dict().items()}},
               nan_vae)
    assert one_line_error(run_precompute(previous, data, f"model.first_stage_config.params.ckpt_path={nan_vae}",
                                         "--overwrite")) == (
        f"error: {toy_data / 'videos' / '00000.mp4'}: the moments computed for it are not finite (NaN or inf): check "
        "the VAE and text encoder weights, and their precision (args.fp16 overflows T5)")
    assert {path.name: path.read_bytes() for path in previous.iterdir()} == files
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad", "nan_vae.pt", "previous"]  # nothing partial

    result = run_precompute(previous, data, "--overwrite", "--clips-per-shard", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in previous.iterdir()) == [MANIFEST, "shard-000-00000.safetensors"]
    assert len(CachedDataset(str(previous), **PARAMS)) == 16


def test_precompute_refuses_an_out_it_cannot_or_must_not_replace(tmp_path, toy_data):
    def refusal(out: Path, *flags: str) -> str:  # in this process: the test above runs the command line
        return script_error("precompute.py", "--out", str(out), *flags, "--base", *TINY, f"args.train_data=[{toy_data}]")

    (tmp_path / "a_file").write_text("mine")
    assert refusal(tmp_path / "a_file" / "cache") == (
        f"--out {tmp_path / 'a_file' / 'cache'} lies below the file {tmp_path / 'a_file'}; give a folder")
    assert refusal(tmp_path / "a_file") == f"--out {tmp_path / 'a_file'} is a file; give a folder"
    assert refusal(tmp_path, "--overwrite") == (
        f"--out {tmp_path} holds files that are not part of a cache (a_file); --overwrite replaces only a cache")
    assert (tmp_path / "a_file").read_text() == "mine"
    work = tmp_path / "work"  # a cache with a researcher's notes and a run beside it
    work.mkdir()
    for name in (MANIFEST, "shard-000-00000.safetensors", "notes.txt", "run1"):
        (work / name).write_text("kept")
    assert refusal(work, "--overwrite") == (
        f"--out {work} holds files that are not part of a cache (notes.txt, run1); --overwrite replaces only a cache")
    assert (work / "notes.txt").read_text() == "kept"
    (tmp_path / "link").symlink_to(work)
    assert refusal(tmp_path / "link", "--overwrite") == (
        f"--out {tmp_path / 'link'} is a symbolic link; give the folder it points to ({work})")


def test_a_shard_of_another_cache_or_one_without_its_clips_is_refused(tmp_path, sharded_cache, mixed_cache):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache, _ = sharded_cache
    edited = tmp_path / "cache"
    shutil.copytree(cache, edited)
    first = sorted(edited.glob("shard-*.safetensors"))[0]
    shutil.copy(next(mixed_cache["cache"].glob("shard-*.safetensors")), first)
    with pytest.raises(ConfigError, match=rf"^the cache {edited}: shard {first.name} was written for another cache "):
        CachedDataset(str(edited), **PARAMS)
    shutil.copy(cache / first.name, first)
    with safe_open(str(first), framework="pt") as shard:  # the same cache's shard, one clip's features gone
        tensors = {name: shard.get_tensor(name) for name in shard.keys() if name != "0.text_features"}
        metadata = shard.metadata()
    save_file(tensors, str(first), metadata=metadata)
    with pytest.raises(ConfigError, match=rf"^the cache {edited}: shard {first.name} lacks 1 of the tensors "
                                          rf"{MANIFEST} places in it \(0.text_features ...\)"):
        CachedDataset(str(edited), **PARAMS)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["sources"][0].update(start=-3), "sources[0]"),
    (lambda m: m["sources"][0].update(weight="2"), "sources[0]"),
    (lambda m: m["sources"][0].update(end=30), "sources[0]"),
    (lambda m: m["sources"][0].update(start=5, end=4), "sources[0]"),
    (lambda m: m.update(sources=[]), "sources"),
    (lambda m: m["shards"].__setitem__(0, "/elsewhere/shard-000-00000.safetensors"), "shards"),
    (lambda m: m["clips"][3].update(shard=99), "clips[3]"),
    (lambda m: m["clips"][3].pop("key"), "clips[3]"),
    (lambda m: m["key"].pop("data"), "key"),
    (lambda m: m.update(clips={}), "clips"),
])
def test_a_hand_edited_manifest_is_refused_naming_the_field(tmp_path, sharded_cache, edit, field):
    cache, _ = sharded_cache
    edited = tmp_path / "cache"
    shutil.copytree(cache, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    edit(manifest)
    (edited / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"^the cache {edited}: {MANIFEST} field {re.escape(field)} is not "):
        CachedDataset(str(edited), **PARAMS)


@pytest.mark.slow
def test_a_bucketed_mix_trains_from_its_cache_by_bucket_with_the_losses_of_the_videos(tmp_path):
    two_shapes, wide = tmp_path / "two_shapes", tmp_path / "wide"
    make_toy_dataset(two_shapes, num=8, size=32, frames=9, fps=8, seed=3)
    wide_clips(two_shapes, num=8, frames=5)
    make_toy_dataset(wide, num=0, size=32, frames=9, fps=8, seed=4)
    wide_clips(wide, num=4, frames=5)
    mix = (f"args.train_data=[{two_shapes},{wide}]", "args.train_data_weights=[1,1.5]", BUCKETS)
    cache = tmp_path / "cache"
    precompute(cache, *mix)
    manifest = json.loads((cache / MANIFEST).read_text())
    # the square 9-frame clips in bucket 0 ([9, 32, 32]), the wide 5-frame ones in bucket 1 ([5, 32, 64])
    assert [clip["bucket"] for clip in manifest["clips"]] == [0] * 8 + [1] * 12
    assert [clip["latent_shape"] for clip in manifest["clips"]] == [[16, 3, 4, 4]] * 8 + [[16, 2, 4, 8]] * 12
    videos = build_dataset(load_config(TINY, list(mix)), [str(two_shapes), str(wide)], "args.train_data",
                           weights=[1, 1.5])
    cached = build_dataset(load_config(TINY, [FROM_CACHE, BUCKETS]), [str(cache)], "args.train_data")
    assert len(cached) == len(videos) == 16 + 6  # the 4 wide clips of the second source fill 6 slots
    assert [group.tolist() for group in bucket_groups(cached)] == [
        group.tolist() for group in bucket_groups(videos)] == [list(range(8)), list(range(8, 22)), []]

    common = ("args.train_iters=4", "args.log_interval=1", "args.save_interval=1000", "args.batch_size=2",
              "args.eval_interval=2", "args.eval_iters=3", "args.eval_batch_size=3", BUCKETS, POSTERIOR_MEAN)
    train(tmp_path / "live", two_shapes, *common, *mix[:2], f"args.valid_data=[{two_shapes}]")
    train(tmp_path / "cached", cache, *common, f"args.valid_data=[{cache}]", FROM_CACHE)
    assert_same_losses(tmp_path / "live", tmp_path / "cached")


@pytest.mark.slow
def test_an_image_to_video_model_trains_from_a_cache_of_first_frames_with_the_losses_of_the_videos(
        tmp_path, toy_data, sharded_cache):
    cache = tmp_path / "i2v_cache"
    output = precompute(cache, f"args.train_data=[{toy_data}]", *I2V)
    assert "cached 16 clips with their first frames" in output
    assert json.loads((cache / MANIFEST).read_text())["first_frames"] is True
    videos = build_dataset(load_config(TINY, list(I2V)), [str(toy_data)], "args.train_data")
    cached = CachedDataset(str(cache), **PARAMS)
    for index in (0, 11):  # the conditioning frame the video dataset gives, in fp32 (the run's precision here)
        assert torch.equal(cached[index]["image"], videos.load(index)["image"])

    common = ("args.train_iters=4", "args.log_interval=1", "args.save_interval=1000", "args.batch_size=2", *I2V,
              "args.eval_interval=2", "args.eval_iters=2", POSTERIOR_MEAN)
    train(tmp_path / "live", toy_data, *common, f"args.valid_data=[{toy_data}]")
    output = train(tmp_path / "cached", cache, *common, f"args.valid_data=[{cache}]", FROM_CACHE)
    assert "T5 is not built; the VAE (" in output and BUILT_FROZEN_PARTS not in output
    assert_same_losses(tmp_path / "live", tmp_path / "cached")

    text_to_video, _ = sharded_cache
    with pytest.raises(ConfigError, match=rf"^the cache {text_to_video} holds no first frames \(it was made for a "
                                          r"text-to-video model\), and model.noised_image_input needs them: make it "
                                          r"again with scripts/precompute.py and this config$"):
        check_caches(*cache_config(text_to_video, *I2V))


def cache_config(cache: Path, *overrides: str):
    config = load_config(TINY, [FROM_CACHE, f"args.train_data=[{cache}]", *overrides])
    return config, args_namespace(config)


def test_changed_vae_or_text_encoder_weights_are_refused_without_loading_them(tmp_path, mixed_cache):
    cache, vae_file = mixed_cache["cache"], mixed_cache["vae_file"]
    vae_key = "model.first_stage_config.params.ckpt_path"
    assert check_caches(*cache_config(cache, f"{vae_key}={vae_file}")) == [32]
    copy = tmp_path / "elsewhere" / "3d-vae.pt"  # the same weights at another path, with another mtime
    copy.parent.mkdir()
    shutil.copy(vae_file, copy)
    assert check_caches(*cache_config(cache, f"{vae_key}={copy}")) == [32]

    changed = {name: value + 1e-3 if name.endswith("conv_in.conv.weight") else value
               for name, value in mixed_cache["vae"].state_dict().items()}
    torch.save({"state_dict": changed}, copy)
    vae_changed = (rf"^the VAE weights \({vae_key}\) differ from those the cache {cache} was made with: make it again "
                   r"with scripts/precompute.py$")
    with pytest.raises(ConfigError, match=vae_changed):
        check_caches(*cache_config(cache, f"{vae_key}={copy}"))
    with pytest.raises(ConfigError, match=r"^the VAE weights .* differ"):  # a random VAE instead of the file
        check_caches(*cache_config(cache))
    embedder = "model.conditioner_config.params.emb_models.0"
    with pytest.raises(ConfigError, match=rf"^the text encoder weights \({embedder}\) differ from those the cache"):
        check_caches(*cache_config(cache, f"{vae_key}={vae_file}", f"{embedder}.params.seed=1"))
    with pytest.raises(ConfigError, match=rf"made with {embedder}.params.max_length=32, the config says 16"):
        check_caches(*cache_config(cache, f"{vae_key}={vae_file}", f"{embedder}.params.max_length=16"))
    with pytest.raises(ConfigError, match=r"made with model.encode_chunk_frames=None, the config says 4"):
        check_caches(*cache_config(cache, f"{vae_key}={vae_file}", "model.encode_chunk_frames=4"))
    encoder = "model.first_stage_config.params.encoder_config"
    for same in (f"{encoder}.params.temporal_compress_times=4", f"{encoder}.params.resolution=256",
                 f"{encoder}.target=satvideo.vae.encoder.ContextParallelEncoder3D"):  # written another way
        assert check_caches(*cache_config(cache, f"{vae_key}={vae_file}", same)) == [32], same
    with pytest.raises(ConfigError, match=rf"^the cache {cache} was made with {encoder}.params.ch=16, the config says "
                                          r"32: make it again"):
        check_caches(*cache_config(cache, f"{vae_key}={vae_file}", f"{encoder}.params.ch=32"))


def test_a_large_weight_file_is_fingerprinted_by_its_content_from_sampled_blocks(tmp_path):
    data = bytearray(torch.randint(0, 256, (40 * BLOCK + 123,), dtype=torch.uint8).numpy().tobytes())
    original, copy = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    original.write_bytes(data)
    copy.write_bytes(data)
    assert file_fingerprint(original) == file_fingerprint(copy)
    for offset in (0, len(data) - 1, (len(data) - BLOCK) * 7 // 15 + 5):  # first, last and a middle block
        changed = bytearray(data)
        changed[offset] ^= 1
        copy.write_bytes(changed)
        assert file_fingerprint(copy) != file_fingerprint(original), offset
