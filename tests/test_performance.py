"""Performance work that must not change results: the compiled transformer equals eager, the benchmark harness
runs every case (speed itself is measured by scripts/benchmark.py, never in a test), and the transformer makes
no more concatenations than diffusers' implementation of the same model."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_line_error, script_error, tiny_inputs, tiny_network_config
from test_training import ROOT, metrics, train

from satvideo.config import instantiate_from_config
from satvideo.convert.transformer import diffusers_transformer_config
from satvideo.data.toy import make_toy_dataset
from satvideo.profiling import count_ops

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from benchmark import RESULTS, diffusers_forward  # noqa: E402


def randomized_network(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    network = instantiate_from_config(tiny_network_config(family))
    with torch.no_grad():
        for parameter in network.parameters():  # non-zero modulations, so that every layer does something
            parameter.normal_(0, 0.05)
    return network


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["2b", "5b"])  # sin-cos positions, rotary positions
def test_compiled_layers_equal_eager_forward_and_gradients(family):
    eager = randomized_network(family)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    inputs = tiny_inputs(family)
    expected, got = eager(**inputs), compiled(**inputs)
    assert relative(got, expected) <= 1e-5
    expected.square().mean().backward()
    got.square().mean().backward()
    for (name, ours), theirs in zip(compiled.named_parameters(), eager.parameters()):
        assert relative(ours.grad, theirs.grad) <= 1e-5, name
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_compiled_layers_stay_compiled_past_dynamos_default_of_8_graphs():
    """Each grid (and grad mode) compiles its own graphs; a 9th must not fall back to eager in silence."""
    from torch._dynamo.utils import counters

    eager = randomized_network("5b")
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    inputs = tiny_inputs("5b", batch=1)
    graphs = []
    for width in range(2, 22, 2):  # 10 grids
        inputs["x"] = torch.randn(1, 3, 16, 2, width, generator=torch.Generator().manual_seed(width))
        with torch.no_grad():
            assert relative(compiled(**inputs), eager(**inputs)) <= 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    # three compiled functions (modulated inputs, gated residual, rotation), one new graph each per grid
    assert [b - a for a, b in zip(graphs, graphs[1:])] == [3] * 9


def test_training_with_compile_logs_the_eager_losses(tmp_path):
    data_dir = tmp_path / "toy"
    make_toy_dataset(data_dir, num=8, size=32, frames=9, fps=8, seed=0)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("args.train_iters=3", "args.log_interval=1", "args.save_interval=3", "args.batch_size=2")
    train(eager, data_dir, *common)
    train(compiled, data_dir, *common, "args.compile=true")
    for ours, theirs in zip(metrics(compiled), metrics(eager), strict=True):
        assert ours["iteration"] == theirs["iteration"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_no_more_concatenations_than_diffusers(family):
    from diffusers import CogVideoXTransformer3DModel

    config = tiny_network_config(family)
    ours = instantiate_from_config(config)
    theirs = CogVideoXTransformer3DModel(**diffusers_transformer_config(config["params"]))
    inputs = tiny_inputs(family)
    with torch.no_grad():
        ours(**inputs)  # position tables are computed once per grid, then cached
        assert count_ops(lambda: ours(**inputs), "cat") <= count_ops(lambda: diffusers_forward(theirs, inputs), "cat")


def test_benchmark_harness_runs_every_case_and_compares_outputs_first(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier entries\n")
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--tiny", "--compile", "--append", str(results)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = [cell.strip() for cell in rows[0]], [[cell.strip() for cell in row] for row in rows[1:]]
    by_case = {}
    for row in rows:
        record = dict(zip(header, row))
        by_case.setdefault(record["case"], []).append(record)
    assert set(by_case) == {"forward", "forward_backward", "train_step", "sampling", "vae_decode", "vae_encode"}
    for case, records in by_case.items():
        names = [record["implementation"] for record in records]
        assert "diffusers" in names and names[0].startswith("satvideo"), case
        compared = {record["implementation"]: float(record["outputs differ by"]) for record in records
                    if record["outputs differ by"]}
        assert compared and all(difference <= 1e-3 for difference in compared.values()), case  # checked before timing
        assert all(float(record["median s"]) > 0 for record in records), case
    assert set(by_case["forward_backward"][i]["implementation"] for i in range(3)) == {
        "satvideo", "diffusers", "satvideo compiled"}
    assert "satvideo compiled" in {record["implementation"] for record in by_case["forward"]}
    # the one-pass encode (GroupNorm over the whole clip) is not compared; the chunked one, as diffusers', is
    encode = {record["implementation"]: record["outputs differ by"] for record in by_case["vae_encode"]}
    assert encode["satvideo"] == "" and float(encode["satvideo chunked"]) <= 1e-4
    entry = results.read_text()
    assert entry.startswith("# earlier entries\n\n## ") and "`python scripts/benchmark.py --tiny --compile --append " \
        in entry and "| vae_encode | 9 frames | satvideo chunked |" in entry


@pytest.mark.parametrize("flags, message", [
    (["--only", ""], "--only: no case in ''; choose from forward, forward_backward, train_step, sampling, vae_decode, "
                     "vae_encode"),
    (["--only", ",", "--no-record"], "--only: no case in ','; choose from forward, forward_backward, train_step, "
                                     "sampling, vae_decode, vae_encode"),
    (["--append", "{tmp}"], "--append {tmp} is a folder; give a file path"),
    (["--append", "{tmp}/notes.txt/RESULTS.md"], "--append {tmp}/notes.txt/RESULTS.md lies below the file "
                                                 "{tmp}/notes.txt; give a file path"),
])
def test_benchmark_refuses_bad_flags_before_anything_runs(tmp_path, flags, message):
    (tmp_path / "notes.txt").write_text("mine")
    before = RESULTS.read_bytes()
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert script_error("benchmark.py", "--tiny", *flags) == message.format(tmp=tmp_path)
    assert RESULTS.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_benchmark_errors_are_one_line_on_the_command_line():
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--tiny", "--only", "nothing", "--no-record"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert one_line_error(result) == ("error: --only: unknown case(s) nothing; choose from forward, forward_backward, "
                                      "train_step, sampling, vae_decode, vae_encode")
    assert "[benchmark]" not in result.stdout


def test_chunked_training_encode_is_the_streamed_encode_with_memory_flat_in_frames():
    from test_engine import tiny_engine

    from satvideo.profiling import peak_memory_bytes

    engine = tiny_engine(encode_chunk_frames=4)
    vae = engine.first_stage_model
    generator = torch.Generator().manual_seed(0)
    peaks = []
    with torch.no_grad():
        for frames in (17, 33):
            video = torch.rand(1, frames, 3, 32, 32, generator=generator) * 2 - 1  # [B, T, 3, H, W]
            latents = engine.encode_first_stage(video, sample=False)
            streamed = vae.encode(video.permute(0, 2, 1, 3, 4), sample=False, chunk_frames=4)
            assert torch.equal(latents, (streamed * engine.scale_factor).permute(0, 2, 1, 3, 4))
            peaks.append(peak_memory_bytes(lambda: engine.encode_first_stage(video, sample=False), torch.device("cpu")))
        one_pass = peak_memory_bytes(lambda: vae.encode(video.permute(0, 2, 1, 3, 4), sample=False),
                                     torch.device("cpu"))
    assert peaks[1] < 1.2 * peaks[0]  # twice the frames, about the same peak: only the chunk and the output grow
    assert peaks[1] < 0.5 * one_pass


def test_zero_buckets_are_never_larger_than_the_trainable_parameters():
    from satvideo.training.deepspeed_setup import fit_buckets_to_model

    small = {"zero_optimization": {"stage": 2}}
    fit_buckets_to_model(small, 132_120_576)  # a 5B LoRA: DeepSpeed would allocate 500M elements per buffer
    assert small["zero_optimization"]["reduce_bucket_size"] == 132_120_576
    large = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1_000_000_000}}
    fit_buckets_to_model(large, 5_570_283_072)  # full 5B: the configured bucket stays
    assert large["zero_optimization"]["reduce_bucket_size"] == 1_000_000_000


# ---- scripts/gpu_smoke.sh, its first lines only: `python` and `nvidia-smi` are stubs that record their calls ----


def run_gpu_smoke(tmp_path, **env: str) -> subprocess.CompletedProcess:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls"}\necho 1\n')  # "1 GPU"
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho Stub GPU\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_smoke.sh")], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_gpu_smoke_refuses_an_occupied_smoke_out_it_did_not_make(tmp_path):
    folder, file = tmp_path / "results", tmp_path / "notes.txt"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    file.write_text("mine")
    for occupied in (folder, file):
        result = run_gpu_smoke(tmp_path, SMOKE_OUT=str(occupied))
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: SMOKE_OUT={occupied} exists and was not made by this script; choose another SMOKE_OUT or "
            "remove it"]
    assert (folder / "mine.txt").read_text() == "mine" and file.read_text() == "mine"
    assert not (tmp_path / "calls").exists()  # refused before anything ran


def test_gpu_smoke_leaves_an_exported_out_alone_and_replaces_only_its_own_folder(tmp_path):
    users, smoke = tmp_path / "users", tmp_path / "smoke"
    users.mkdir()
    (users / "mine.txt").write_text("mine")
    smoke.mkdir()
    (smoke / ".made_by_gpu_smoke").touch()
    (smoke / "earlier_run.txt").touch()
    result = run_gpu_smoke(tmp_path, OUT=str(users), SMOKE_OUT=str(smoke))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("=== gpu smoke test passed in ")
    assert [path.name for path in users.iterdir()] == ["mine.txt"] and (users / "mine.txt").read_text() == "mine"
    assert [path.name for path in smoke.iterdir()] == [".made_by_gpu_smoke"]  # the stubs wrote nothing
    calls = (tmp_path / "calls").read_text()
    assert f"--out {smoke}/toy " in calls and str(users) not in calls


# ---- scripts/benchmark_data.py ----


def run_benchmark_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/benchmark_data.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--clips", "0"], "--clips=0: expected a whole number >= 1"),
    (["--passes", "0"], "--passes=0: expected a whole number >= 1"),
    (["--workers", "0", "-1"], "--workers=-1: expected a whole number >= 0"),
    (["--batch-size", "0"], "--batch-size=0: expected a whole number >= 1"),
    (["--shape", "16x64"], "--shape 16x64: frames 16: expected 4k+1 frames for the causal VAE (1, 5, 9, ...)"),
    (["--data", "{tmp}/none"], "--data {tmp}/none: not a folder (give an SFT folder: videos/*.mp4, labels/*.txt)"),
    (["--append", "{tmp}"], "--append {tmp} is a folder; give a file path"),
    (["--append", "/dev/null/RESULTS.md"], "--append /dev/null/RESULTS.md lies below the file /dev/null; give a file "
                                           "path"),
])
def test_benchmark_data_refuses_a_bad_flag_before_anything_is_made(tmp_path, flags, message):
    # in this process; the next test runs the command line
    assert script_error("benchmark_data.py", *[flag.format(tmp=tmp_path) for flag in flags]) == \
        message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing measured


def test_benchmark_data_says_why_precompute_failed_and_appends_nothing(tmp_path):
    data, results = tmp_path / "not_sft", tmp_path / "RESULTS.md"
    data.mkdir()
    results.write_text("# mine\n")
    result = run_benchmark_data("--data", str(data), "--shape", "1x32", "--append", str(results))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: scripts/precompute.py failed (exit 2): args.train_data {data}: video folder {data / 'videos'} does "
        "not exist (expected videos/*.mp4 and labels/*.txt)")
    assert results.read_text() == "# mine\n" and sorted(tmp_path.iterdir()) == sorted([data, results])
    assert list(data.iterdir()) == []


def test_an_entry_is_appended_whole_after_the_earlier_text_or_starts_a_new_file(tmp_path):
    from benchmark import append_entry

    results = tmp_path / "RESULTS.md"
    results.write_text("# mine · earlier entries\n", encoding="utf-8")
    append_entry(results, "| a table |", "python scripts/benchmark_data.py --clips 1", torch.device("cpu"))
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# mine · earlier entries\n\n## ")
    assert text.endswith("\n\n`python scripts/benchmark_data.py --clips 1`\n\n| a table |\n")
    assert list(tmp_path.iterdir()) == [results]  # no partial file left beside it
    fresh = tmp_path / "new" / "RESULTS.md"
    append_entry(fresh, "| a table |", "python scripts/benchmark.py --tiny", torch.device("cpu"))
    assert fresh.read_text(encoding="utf-8").startswith("# Benchmark results\n\nEntries appended by the benchmark "
                                                        "scripts, newest last.\n\n## ")


@pytest.mark.parametrize("family", ["2b", "5b"])  # sin-cos table, rotary angles
def test_position_tables_first_made_under_inference_mode_serve_training(family):
    network = randomized_network(family)
    inputs = tiny_inputs(family)
    with torch.inference_mode():
        expected = network(**inputs)
    output = network(**inputs)
    output.square().mean().backward()
    assert torch.equal(output.detach(), expected)
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
