"""diffusers is a test and conversion dependency only: training and sampling code never imports it."""

import sys

from test_training import run

CHECK = """
import sys, runpy
sys.argv = ["sample_video.py"]
import satvideo.training.loop, satvideo.engine, satvideo.convert.transformer, satvideo.convert.lora
runpy.run_path("sample_video.py", run_name="not_main")  # imports everything the sampler uses
from conftest import tiny_network_config
from satvideo.config import instantiate_from_config
instantiate_from_config(tiny_network_config("1.5_5b_i2v"))
leaked = sorted(name for name in sys.modules if name.split(".")[0] in ("diffusers", "peft"))
print("LEAKED", leaked)
"""


def test_training_sampling_and_conversion_do_not_import_diffusers():
    output = run([sys.executable, "-c", CHECK], timeout=120, PYTHONPATH="tests")
    assert "LEAKED []" in output, output[-2000:]
