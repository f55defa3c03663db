"""Typed, validated training settings (ban/configs.py): every wrong type or value, from a YAML file,
a flag or `--set`, is an error naming the key and what it expects; the layers and round trips of
the presets are kept."""

import pytest
import yaml

from ban import configs
from ban.cli import main


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"lr": "abc"}, "lr must be a number, got 'abc'"),
        ({"grad_clip": "x"}, "grad_clip must be a number, got 'x'"),
        ({"lr_decay_epochs": "ten"}, "lr_decay_epochs[0] must be a number, got 'ten'"),
        ({"lr_decay_epochs": [6, "x"]}, "lr_decay_epochs[1] must be a number, got 'x'"),
        ({"lr_warmup": [0.5, -1]}, "lr_warmup[1] must be > 0, got -1"),
        ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
        ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"epochs": True}, "epochs must be an integer, not true/false, got True"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"grad_accum": 0}, "grad_accum must be >= 1, got 0"),
        ({"lr": 0}, "lr must be > 0, got 0"),
        ({"lr": -1e-3}, "lr must be > 0, got -0.001"),
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"grad_clip": -0.5}, "grad_clip must be >= 0, got -0.5"),
        ({"lr_decay_factor": 0}, "lr_decay_factor must be > 0, got 0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),
        ({"log_every": 0}, "log_every must be >= 1, got 0"),
        ({"amp": "fp8"}, "amp must be 'bf16' or 'fp16' or null, got 'fp8'"),
        ({"task": "caption"}, "task must be 'vqa' or 'flickr', got 'caption'"),
        ({"protocol": "all"}, "protocol must be 'any' or 'merged', got 'all'"),
        ({"optimizer": "sgd"}, "optimizer must be 'adamax', got 'sgd'"),
        ({"compile": "maybe"}, "compile must be true or false, got 'maybe'"),
        ({"train_splits": []}, "train_splits must not be empty, got []"),
        ({"data": 12}, "data must be a string, got 12"),
        ({"device": "gpu"}, "device must be a device such as cpu, cuda, cuda:1 or mps, got 'gpu'"),
        ({"model": "ban-huge"}, "model must be a model preset, one of ban-8-vqa"),
        ({"model.hidden": "abc"}, "model.hidden must be an integer, got 'abc'"),
        ({"model.dropout": "high"}, "model.dropout must be a number, got 'high'"),
        ({"model.counter": "maybe"}, "model.counter must be true or false, got 'maybe'"),
        ({"model.nosuchfield": 1}, "model.nosuchfield: unknown model setting; expected one of"),
        ({"model.glimpses": 40}, "model.glimpses must be in 1..32, got 40"),
        ({"model_overrides": {"hidden": "{x}"}}, "model.hidden must be an integer, got '{x}'"),
        ({"task": "flickr"}, "task flickr needs a grounding model, but model ban-small is a vqa"),
    ],
)
def test_a_wrong_setting_names_the_key_and_what_it_expects(values, expected):
    with pytest.raises(configs.ConfigError) as caught:
        configs.resolve("vqa-small", overrides=values)
    assert str(caught.value).startswith("command line: ")
    assert expected in str(caught.value)


def test_values_are_coerced_only_where_unambiguous():
    config = configs.resolve(
        "vqa-small",
        overrides={"lr": "1e-3", "epochs": "3", "lr_decay_epochs": 2, "train_splits": "val2014"},
    )
    # YAML reads `1e-3` as a string: it is the number 0.001
    assert (config.lr, config.epochs) == (1e-3, 3)
    assert (config.lr_decay_epochs, config.train_splits) == ([2], ["val2014"])
    assert configs.lr_at(config, 1) == pytest.approx(1e-3)
    assert configs.lr_at(config, 2) == pytest.approx(0.25e-3)


def test_a_yaml_file_with_wrong_values_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("recipe: vqa-small\nepochs: 3\ngrad_clip: x\nmodel_overrides: {hidden: abc}\n")
    with pytest.raises(configs.ConfigError) as caught:
        configs.resolve(None, path)
    lines = str(caught.value).splitlines()
    assert f"{path}: grad_clip must be a number, got 'x'" in lines
    assert f"{path}: model.hidden must be an integer, got 'abc'" in lines
    (tmp_path / "broken.yaml").write_text("epochs: [3\n")
    with pytest.raises(configs.ConfigError, match="broken.yaml: not a YAML file"):
        configs.resolve(None, tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- epochs\n")
    with pytest.raises(configs.ConfigError, match="expected a mapping of training settings"):
        configs.resolve(None, tmp_path / "list.yaml")
    # a run's config.yaml edited by hand is checked the same way on --resume
    (tmp_path / "run.yaml").write_text("model: ban-small\nlr: abc\n")
    with pytest.raises(configs.ConfigError, match="run.yaml: lr must be a number, got 'abc'"):
        configs.from_yaml(tmp_path / "run.yaml")


def test_presets_layers_and_round_trip(tmp_path):
    for name in configs.RECIPES:
        config = configs.recipe(name)
        assert config == configs.RECIPES[name] and config is not configs.RECIPES[name]
        configs.save_yaml(config, tmp_path / f"{name}.yaml")
        assert configs.from_yaml(tmp_path / f"{name}.yaml") == config
        assert yaml.safe_load((tmp_path / f"{name}.yaml").read_text()) == config.to_dict()
    # a preset's copy is independent: changing its lists leaves the preset as it was
    copy = configs.recipe("flickr-small")
    copy.lr_decay_epochs.append(99)
    copy.model_overrides["hidden"] = 1
    assert configs.RECIPES["flickr-small"].lr_decay_epochs[-1] != 99
    assert configs.RECIPES["flickr-small"].model_overrides["hidden"] == 128
    config = configs.override(copy, {"model.glimpses": 2, "seed": 7})
    assert config.model_overrides == {"embedding_dim": 64, "hidden": 1, "glimpses": 2}
    assert config.seed == 7 and copy.seed == 1204
    assert not list(tmp_path.glob(".*.tmp*"))  # written atomically, nothing left behind


def test_assignment_is_validated_and_fields_are_kept():
    config = configs.recipe("vqa-small")
    with pytest.raises(ValueError, match="lr"):
        config.lr = "fast"
    assert set(config.to_dict()) == set(configs.TrainConfig.model_fields)
    assert configs.RUNTIME_FIELDS <= set(config.to_dict())
    assert configs.TrainConfig().base_lr() == 1e-3
    assert configs.TrainConfig(eval_split=None).base_lr() == 7e-4


def test_the_command_line_names_the_setting(tmp_path, capsys):
    for flag, expected in [
        ("lr=abc", "lr must be a number, got 'abc'"),
        ("grad_clip=x", "grad_clip must be a number, got 'x'"),
        ("lr_decay_epochs=ten", "lr_decay_epochs[0] must be a number, got 'ten'"),
        ("model.hidden=abc", "model.hidden must be an integer, got 'abc'"),
        ("model.nosuchfield=1", "model.nosuchfield: unknown model setting"),
        ("lr_decay_epochs=[1,", "--set lr_decay_epochs=[1,: not a YAML value"),
    ]:
        assert main(["train", "--out", str(tmp_path / "run"), "--set", flag, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ban: error: ") and expected in err, err
        assert "Traceback" not in err
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "0", "--quiet"]) == 2
    assert "command line: epochs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before a run directory is made
