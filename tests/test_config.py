"""Config loading: merge order, overrides, `args` validation, target aliases and their errors."""

from pathlib import Path

import pytest
import torch

from satvideo.config import (ARGS_DEFAULTS, LEGACY_TARGETS, ConfigError, get_obj_from_str, instantiate_from_config,
                             load_config, resolve_target)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_later_files_override_earlier_ones_and_merge_nested_keys(tmp_path):
    a = write(tmp_path, "a.yaml", "args: {train_iters: 10, log_interval: 5}\nmodel: {x: {y: 1, z: 2}}\n")
    b = write(tmp_path, "b.yaml", "args: {train_iters: 20}\nmodel: {x: {z: 3}}\n")
    config = load_config([a, b])
    assert config.args.train_iters == 20
    assert config.args.log_interval == 5
    assert dict(config.model.x) == {"y": 1, "z": 3}


def test_overrides_apply_after_files_and_parse_values(tmp_path):
    a = write(tmp_path, "a.yaml", "args: {train_iters: 10}\nmodel: {network_config: {params: {num_layers: 30}}}\n")
    config = load_config([a], ["args.train_iters=20", "model.network_config.params.num_layers=2",
                               "args.train_data=[d1,d2]", "args.bf16=true"])
    assert config.args.train_iters == 20
    assert config.model.network_config.params.num_layers == 2
    assert list(config.args.train_data) == ["d1", "d2"]
    assert config.args.bf16 is True


def test_unspecified_args_take_defaults(tmp_path):
    config = load_config([write(tmp_path, "a.yaml", "model: {}\n")])
    assert config.args.lr_decay_style == ARGS_DEFAULTS["lr_decay_style"]
    assert config.args.save is None


def test_unknown_args_key_names_it_and_the_closest_valid_key(tmp_path):
    a = write(tmp_path, "a.yaml", "args: {train_iter: 10}\n")
    with pytest.raises(ConfigError, match=r"unknown key args\.train_iter; did you mean args\.train_iters\?"):
        load_config([a])
    with pytest.raises(ConfigError, match=r"unknown key args\.log_intervall; did you mean args\.log_interval\?"):
        load_config([], ["args.log_intervall=3"])


def test_missing_file_and_malformed_override_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config([str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="override 'args.seed' is not of the form key=value"):
        load_config([], ["args.seed"])
    bad = write(tmp_path, "bad.yaml", "args: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse config file .*bad.yaml"):
        load_config([bad])


def test_every_alias_resolves_to_an_importable_satvideo_class():
    for legacy, target in LEGACY_TARGETS.items():
        assert resolve_target(legacy) == target
        assert callable(get_obj_from_str(legacy)), legacy


def test_official_targets_of_every_kind_resolve():
    assert get_obj_from_str("dit_video_concat.DiffusionTransformer").__name__ == "DiffusionTransformer"
    assert get_obj_from_str("sgm.modules.encoders.modules.FrozenT5Embedder").__name__ == "FrozenT5Embedder"
    assert get_obj_from_str("sgm.modules.diffusionmodules.sampling.VPSDEDPMPP2MSampler").__name__ == "VPSDEDPMPP2MSampler"
    assert get_obj_from_str("vae_modules.autoencoder.VideoAutoencoderInferenceWrapper").__name__ == "VideoAutoencoder"
    assert get_obj_from_str("data_video.SFTDataset").__name__ == "SFTDataset"


def test_unknown_legacy_target_suggests_the_closest_alias():
    with pytest.raises(ConfigError, match=r"no satvideo counterpart; did you mean dit_video_concat\.AdaLNMixin\?"):
        resolve_target("dit_video_concat.AdaLNMixn")


def test_bad_targets_name_the_problem():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        get_obj_from_str("no_such_module.Thing")
    with pytest.raises(ConfigError, match="module 'torch.nn' has no attribute 'Nope'"):
        get_obj_from_str("torch.nn.Nope")
    with pytest.raises(ConfigError, match="expected a mapping with a 'target' key"):
        instantiate_from_config({"params": {}})


def test_instantiate_merges_params_and_extra_kwargs():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3}}, out_features=5)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (5, 3)


def test_command_line_tells_files_from_overrides(tmp_path):
    from satvideo.cli import parse_config

    odd_name = write(tmp_path, "lr=1e-3.yaml", "args: {train_iters: 7}\n")
    config = parse_config("test", ["--base", odd_name, "args.seed=3"])
    assert config.args.train_iters == 7 and config.args.seed == 3
    with pytest.raises(ConfigError, match=r"override 'modle.x=1': unknown section 'modle'; expected one of args, model"):
        parse_config("test", ["--base", odd_name, "modle.x=1"])


@pytest.mark.parametrize("override, message", [
    ("args.train_iters=0", "args.train_iters=0: expected a whole number >= 1"),
    ("args.save_interval=0", "args.save_interval=0: expected a whole number >= 1"),
    ("args.log_interval=-1", "args.log_interval=-1: expected a whole number >= 1"),
    ("args.keep_last=0", "args.keep_last=0: expected a whole number >= 1 (or null)"),
    ("args.ema_decay=1.5", "args.ema_decay=1.5: expected a number between 0 and 1, e.g. 0.9999 (or null)"),
    ("args.zero_stage=2.0", "args.zero_stage=2.0: expected one of 0, 1, 2, 3 (or null)"),
    ("args.seed=abc", "args.seed='abc': expected a whole number from 0 to 4294967295"),
    ("args.seed=-1", "args.seed=-1: expected a whole number from 0 to 4294967295"),
    ("args.batch_size=0", "args.batch_size=0: expected a whole number >= 1 (or null)"),
    ("args.zero_stage=7", "args.zero_stage=7: expected one of 0, 1, 2, 3 (or null)"),
    ("args.lr_decay_style=step", "args.lr_decay_style='step': expected one of constant, linear, cosine, exponential"),
    ("args.lr_decay_ratio=-1", "args.lr_decay_ratio=-1: expected a number >= 0 and <= 1"),
    ("args.warmup=-1", "args.warmup=-1: expected a number >= 0"),
    ("args.sampling_fps=-3", "args.sampling_fps=-3: expected a number > 0"),
    ("args.sampling_fps=0", "args.sampling_fps=0: expected a number > 0"),
    ("args.sampling_num_frames=abc", "args.sampling_num_frames='abc': expected a whole number >= 1 (or null)"),
    ("args.sampling_image_size=32", "args.sampling_image_size=32: expected [height, width] in pixels (or null)"),
    ("args.sampling_image_size=[32]", "args.sampling_image_size=[32]: expected [height, width] in pixels (or null)"),
    ("args.num_samples=0", "args.num_samples=0: expected a whole number >= 1"),
    ("args.input_type=foo", "args.input_type='foo': expected one of txt, cli"),
    ("args.overwrite=maybe", "args.overwrite='maybe': expected true or false"),
    ("args.lr=-1", "unknown key args.lr; it is set as deepspeed.optimizer.params.lr"),
])
def test_args_values_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(["configs/tiny/model.yaml"], [override])
    assert str(error.value) == message


def test_yaml_problems_are_one_line_naming_the_file_and_place(tmp_path):
    bad = write(tmp_path, "bad.yaml", "args:\n  train_iters: [1, 2\n")
    with pytest.raises(ConfigError) as error:
        load_config([bad])
    assert str(error.value) == f"cannot parse config file {bad}: did not find expected ',' or ']' (line 3, column 1)"
    listed = write(tmp_path, "list.yaml", "- a\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected sections \(args, model, data, deepspeed\) at the top"):
        load_config([listed])


@pytest.mark.parametrize("text, message", [
    ("args: [1, 2]\n", "config file {path}: args: expected a mapping (as in the files before), found a list"),
    ("data:\n  params: [1]\n", "config file {path}: data.params: expected a mapping (as in the files before), found "
                                "a list"),
    ("deepspeed:\n  optimizer: [1]\n", "config file {path}: deepspeed.optimizer: expected a mapping (as in the files "
                                       "before), found a list"),
    ("model:\n  network_config: {params: {transformer_args: {num_layers: 1}}}\n  conditioner_config:\n    params:\n"
     "      emb_models: {a: 1}\n", "config file {path}: model.conditioner_config.params.emb_models: expected a list (as "
                                  "in the files before), found a mapping"),
    ("args: 5\n", "section args: expected a mapping of keys, found 5"),
])
def test_a_later_file_that_changes_a_mapping_into_a_list_is_named(tmp_path, text, message):
    later = write(tmp_path, "later.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_config(["configs/tiny/model.yaml", "configs/tiny/train.yaml", later])
    assert str(error.value) == message.format(path=later)


def test_a_section_that_is_not_a_mapping_is_named_from_a_file_or_an_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^section args: expected a mapping of keys, found \[1, 2\]$"):
        load_config([write(tmp_path, "only.yaml", "args: [1, 2]\n")])
    with pytest.raises(ConfigError, match=r"^section data: expected a mapping of keys, found 3$"):
        load_config(["configs/tiny/model.yaml"], ["data=3"])


def test_an_override_whose_value_ends_in_yaml_is_an_override_and_model_yaml_a_file(tmp_path, monkeypatch):
    from satvideo.cli import parse_config

    config = parse_config("test", ["--base", "configs/tiny/model.yaml", "args.experiment_name=exp.yaml"])
    assert config.args.experiment_name == "exp.yaml"
    with pytest.raises(ConfigError, match="override 'args.train_iters' is not of the form key=value"):
        parse_config("test", ["--base", "configs/tiny/model.yaml", "args.train_iters"])
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "args.yaml", "args: {train_iters: 7}\n")
    assert parse_config("test", ["--base", "args.yaml"]).args.train_iters == 7


def test_an_override_that_is_not_yaml_says_to_quote_it():
    with pytest.raises(ConfigError) as error:
        load_config([], ["args.train_data=[shards/x-{0..2}.tar]"])
    assert str(error.value) == ("cannot apply override 'args.train_data=[shards/x-{0..2}.tar]': did not find expected "
                                "',' or ']' (line 1, column 11); quote a value that holds braces, commas or colons "
                                "('...')")
    assert load_config([], ["args.train_data=['shards/x-{0..2}.tar']"]).args.train_data == ["shards/x-{0..2}.tar"]


def test_output_checks_refuse_a_folder_that_takes_no_new_files(tmp_path, monkeypatch):
    """As for a read-only folder (root passes any mode check, so the refusal is simulated for `locked`)."""
    import os

    from satvideo import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(ConfigError, match=rf"^--out {locked / 'toy'}: cannot create files in {locked}$"):
        cli.check_output_folder(str(locked / "toy"), "--out", overwrite=False)
    with pytest.raises(ConfigError, match=rf"^--out {locked / 'a.pt'}: cannot create files in {locked}$"):
        cli.check_output_file(locked / "a.pt", "--out", overwrite=False)
    cli.check_output_folder(str(tmp_path / "toy"), "--out", overwrite=False)
    # a folder whose files are written in it needs only itself to take them (lora-to-diffusers' --out)
    inside = locked / "lora"
    inside.mkdir()
    cli.check_output_folder(str(inside), "--out", overwrite=True, replaced_whole=False)
    with pytest.raises(ConfigError, match=rf"^--out {locked}: cannot create files in {locked}$"):
        cli.check_output_folder(str(locked), "--out", overwrite=True, replaced_whole=False)
    # a symlinked --out is renamed beside the link, so the link's folder is the one checked
    (tmp_path / "link").symlink_to(locked / "lora")
    cli.check_output_folder(str(tmp_path / "link"), "--out", overwrite=True)
