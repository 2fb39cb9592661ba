"""Context-parallel VAE (satvideo/parallel/context_vae.py): decode and encode with the time axis over 2 and 4
gloo ranks equal one rank's chunked decode and encode with the same chunk boundaries; too-short inputs."""

import json
import sys

import pytest

from satvideo.parallel.context_vae import context_chunks, default_chunk_frames
from test_training import run

TOLERANCE = 1e-5


def run_worker(tmp_path, ranks: int) -> dict:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         "tests/parallel_vae_worker.py", str(tmp_path)], timeout=120)
    return json.loads((tmp_path / "results.json").read_text())


@pytest.mark.parametrize("ranks", [2])  # 4 ranks pass too (rounds of 4); left out for the suite's time
def test_context_parallel_decode_and_encode_equal_one_rank(tmp_path, ranks):
    results = run_worker(tmp_path, ranks)
    errors = results.pop("errors")
    print(json.dumps(results, indent=1))
    assert len(results) == 2 * (3 if ranks == 2 else 2) + 3
    for case, figures in results.items():
        assert figures["max_rel"] < TOLERANCE, (case, figures)
        assert figures["chunks"] >= ranks, (case, figures)
    assert results[f"decode T'={2 * ranks + 1} default"]["chunks"] == ranks  # one round
    assert results[f"decode T'={3 * ranks + 1} default"]["chunks"] > ranks  # a partial second round
    assert results["encode mean default"]["chunks"] == ranks
    too_short = f"{2 * ranks - 1} latent frames are too few to split over {ranks} context-parallel ranks: " \
                f"at least {2 * ranks} are needed"
    assert errors == {
        "decode too short": too_short,
        "decode too few chunks": f"chunk_frames=8 splits 9 latent frames into 1 chunks, fewer than the {ranks} "
                                 "context-parallel ranks",
        "encode too short": f"{4 * ranks - 1} frames are too few to split over {ranks} context-parallel ranks: "
                            f"at least {4 * ranks} are needed",
    }


@pytest.mark.parametrize("num_frames, ranks, chunk_frames, expected", [
    (13, 2, None, [(0, 7), (7, 13)]),
    (9, 4, None, [(0, 3), (3, 5), (5, 7), (7, 9)]),
    (7, 2, None, [(0, 3), (3, 5), (5, 7)]),
    (9, 2, 2, [(0, 3), (3, 5), (5, 7), (7, 9)]),
])
def test_context_chunks_give_every_rank_a_chunk(num_frames, ranks, chunk_frames, expected):
    chunks = context_chunks(num_frames, 2, ranks, chunk_frames, "latent frames")
    assert [(chunk.start, chunk.stop) for chunk in chunks] == expected


def test_too_short_inputs_are_one_line_errors():
    assert default_chunk_frames(5, 2, 4) == 0
    with pytest.raises(ValueError, match=r"^5 latent frames are too few to split over 4 context-parallel ranks: "
                                         r"at least 8 are needed$"):
        context_chunks(5, 2, 4, None, "latent frames")
    with pytest.raises(ValueError, match="^chunk_frames must be a positive multiple of 4, got 6$"):
        context_chunks(17, 4, 2, 6, "frames")
