"""Sequence parallelism: the tiny transformer of every family split over 2 and 4 ranks (gloo) equals one rank,
outputs and gradients, with video tokens that split unevenly."""

import json
import sys

import pytest

from satvideo.parallel.sequence import split_sizes
from test_training import run


def test_split_sizes_are_contiguous_and_cover_every_token():
    assert split_sizes(30, 4) == [8, 8, 7, 7] and split_sizes(48, 2) == [24, 24]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_transformer_equals_one_rank(tmp_path, ranks):
    out = tmp_path / "errors.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         "tests/parallel_sp_worker.py", str(out)], PYTHONPATH="tests")
    errors = json.loads(out.read_text())
    assert set(errors) == {"2b", "5b", "5b_i2v", "1.5_5b", "1.5_5b_i2v"}
    for family, error in errors.items():
        assert error["output"] < 1e-5 and error["grads"] < 1e-5, (family, error)
