"""Settings and command line: one table makes the flags, the recorded config and the resume check."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMISED_RECIPES, QUICK, SCRIPT

import mnist_recognition as app
from companions.training import command_line, devices


def help_text(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        app.main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_training_setting_with_its_default_and_each_recipes_value(capsys):
    text = " ".join(help_text(capsys).split())  # argparse wraps lines
    for setting in app.SETTINGS:
        if "train" in setting.commands:
            assert setting.flag in text
            assert " ".join(setting.help.split()[:4]) in text
            if setting.default is not None and setting.default is not False:
                assert f"(default: {app.as_text(setting.default)}" in text
    for recipe, values in app.RECIPES.items():
        for name, value in values.items():
            assert f"{recipe}: {app.as_text(value)}" in text
            assert f"--{name.replace('_', '-')} {app.as_text(value)}" in text  # the recipes' list at the end
    assert "(default: 10; fast: " in text
    assert "evaluate" in text and "predict" in text


@pytest.mark.parametrize("command", ["evaluate", "predict", "serve", "finetune", "export"])
def test_other_commands_have_help_with_their_settings(command, capsys):
    text = help_text(capsys, command)
    assert "--checkpoint" in text
    # Flags of the same name that these commands declare themselves, with defaults of their own.
    own = {"evaluate": {"out_dir"}, "finetune": {"out_dir", "lr", "batch_size"}}.get(command, set())
    for setting in app.SETTINGS:
        assert (setting.flag in text) == (command in setting.commands or setting.name in own), setting.flag


@pytest.mark.parametrize("args", [[], ["train"]])
def test_help_lists_every_command(args, capsys):
    """`mnist_recognition.py --help` is train's help, which names every command, finetune too."""
    text = help_text(capsys, *args)
    assert all(f"\n  {command} " in text for command in app.COMMANDS) and "finetune" in app.COMMANDS


def test_the_parsers_own_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command_line.build_parser(app.SETTINGS, app.RECIPES).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"\n  {command} " in text for command in app.COMMANDS)


@pytest.mark.parametrize("typo, suggestion", [("trian", "train"), ("evalute", "evaluate"), ("fine-tune", "finetune")])
def test_a_mistyped_command_is_named_with_the_commands_in_one_line(typo, suggestion, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main([typo, "--epochs", "1", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"'{typo}' is not a command (did you mean '{suggestion}'?)" in err
    assert "the commands are train, evaluate, predict, serve, finetune, export" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--epochs", "0"],
        ["--epochs", "-3"],
        ["--batch-size", "0"],
        ["--lr", "0"],
        ["--lr", "-0.1"],
        ["--lr", "nan"],
        ["--lr", "inf"],
        ["--train-limit", "0"],
        ["--test-limit", "-5"],
        ["--device", "tpu"],
        ["--epochs", "ten"],
        ["--no-such-flag"],
    ],
)
def test_invalid_values_are_refused_with_exit_code_2_before_any_work(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main([*flags, "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("device", ["cuda", "mps", "xpu"])
@pytest.mark.parametrize(
    "command", [["--out-dir"], ["evaluate", "--out-dir"], ["predict", "x.png", "--show"], ["serve", "--checkpoint"]]
)
def test_an_accelerator_is_refused_where_there_is_none(device, command, tmp_path, capsys):
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device:
        pytest.skip(f"this machine has {device}, so --device {device} is allowed")
    with pytest.raises(SystemExit) as exit_info:
        app.main([*command, str(tmp_path / "out"), "--device", device])
    assert exit_info.value.code == 2
    assert f"--device {device}: {device.upper()} is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_picks_the_accelerator_where_there_is_one_else_the_cpu():
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    assert devices.pick_device("auto").type == (accelerator.type if accelerator is not None else "cpu")
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_a_recipe_sets_its_settings_and_an_explicit_flag_wins():
    fast = app.parse_args(["--recipe", "fast"])
    for name, value in app.RECIPES["fast"].items():
        assert getattr(fast, name) == value
    assert fast.seed == 0 and fast.log_interval == 200  # settings the recipe leaves alone
    mixed = app.parse_args(["--recipe", "fast", "--epochs", "7", "--adam-betas", "0.8,0.95"])
    assert mixed.epochs == 7 and mixed.adam_betas == (0.8, 0.95)
    assert mixed.batch_size == app.RECIPES["fast"]["batch_size"]
    original = app.parse_args([])
    assert all(getattr(original, s.name) == s.default for s in app.SETTINGS if "train" in s.commands)


@pytest.mark.parametrize("recipe", PROMISED_RECIPES)
def test_each_recipe_is_what_the_readme_promises(recipe):
    config = app.training_config(app.parse_args(["--recipe", recipe]))
    assert {name: config[name] for name in PROMISED_RECIPES[recipe]} == PROMISED_RECIPES[recipe]


def test_the_default_recipe_is_the_original_one():
    config = app.training_config(app.parse_args([]))
    assert config["recipe"] == "original"
    assert {name: config[name] for name in PROMISED_RECIPES["original"]} == PROMISED_RECIPES["original"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--adam-betas", "0.9"],
        ["--adam-betas", "0.9,1.0"],
        ["--adam-betas", "a,b"],
        ["--label-smoothing", "1"],
        ["--warmup", "-0.1"],
        ["--validation", "-1"],
        ["--recipe", "slow"],
        ["--recipe", "seed"],
        ["--schedule", "linear"],
        ["--augment", "mixup"],
    ],
)
def test_bad_recipe_settings_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.parse_args(flags)
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_no_command_means_train():
    assert app.parse_args(["--epochs", "3"]).command == "train"
    assert app.parse_args([]).command == "train"
    assert app.parse_args(["evaluate"]).command == "evaluate"


def test_the_recorded_config_is_every_recorded_training_setting():
    args = app.parse_args(["--epochs", "3", "--lr", "0.01", "--out-dir", "somewhere", "--no-download"])
    config = app.training_config(args)
    assert set(config) == {s.name for s in app.SETTINGS if s.recorded and "train" in s.commands}
    assert config["epochs"] == 3 and config["lr"] == 0.01 and config["batch_size"] == 64
    assert config["out_dir"] == "somewhere"  # paths are recorded as text, so the config is JSON
    assert config["adam_betas"] == [0.9, 0.999] and config["recipe"] == "original"
    assert "resume" not in config and "no_download" not in config


@pytest.mark.slow
def test_a_setting_added_to_the_table_is_a_flag_recorded_and_checked_on_resume(
    monkeypatch, synthetic_data, tmp_path, cli
):
    """Adding a setting is one line in SETTINGS: the flag, the config and the resume check follow."""
    added = app.Setting("momentum_of_nothing", 0.5, "a setting that only this test has", float, must_match=True)
    monkeypatch.setattr(app, "SETTINGS", (*app.SETTINGS, added))
    args = app.parse_args(["--momentum-of-nothing", "0.25"])
    assert args.momentum_of_nothing == 0.25 and app.parse_args([]).momentum_of_nothing == 0.5
    assert app.training_config(args)["momentum_of_nothing"] == 0.25

    flags = (*QUICK, "--epochs", 1, "--train-limit", 64, "--data-dir", synthetic_data, "--out-dir", tmp_path)
    assert cli(*flags).code == 0
    refused = cli(*flags, "--epochs", 2, "--momentum-of-nothing", 0.75, "--resume")
    assert refused.code == 2 and "--momentum-of-nothing 0.5 (now 0.75)" in refused.log


def test_the_table_declares_each_setting_once_with_help():
    names = [setting.name for setting in app.SETTINGS]
    assert len(names) == len(set(names))
    assert all(setting.help and set(setting.commands) <= set(app.COMMANDS) for setting in app.SETTINGS)


def test_every_default_and_recipe_value_is_one_the_flag_accepts():
    """What the table and the recipes hold is what argparse would make of the flag's text."""
    for setting in app.SETTINGS:
        values = [setting.default] + [recipe[setting.name] for recipe in app.RECIPES.values() if setting.name in recipe]
        for value in values:
            if setting.choices:
                assert value in setting.choices, setting.name
            elif setting.type is not None and value is not None:
                assert setting.type(app.as_text(value)) == value, setting.name


def test_positive_number_types_refuse_zero_and_non_numbers():
    for convert, text in ((app.positive_int, "0"), (app.positive_float, "-1"), (app.positive_float, "nan")):
        with pytest.raises(argparse.ArgumentTypeError):
            convert(text)
    assert app.positive_int("7") == 7 and app.positive_float("1e-3") == 1e-3


@pytest.mark.slow
def test_importing_the_script_leaves_out_what_only_some_commands_need():
    """torchvision (fetching data), matplotlib (figures) and ONNX (export) are imported where they are used."""
    probe = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import mnist_recognition; "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'torchvision', 'matplotlib', 'onnx', "
        "'onnxruntime', 'onnxscript'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_importing_the_script_loads_only_the_companions_every_command_needs():
    """predict, serve, export, evaluate and the report are imported by the command that runs them."""
    probe = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import mnist_recognition; "
        "print(sorted(name for name in sys.modules if name.startswith('companions')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plumbing = {
        "training": (
            "adam",
            "augment",
            "command_line",
            "dataset_files",
            "datasets",
            "devices",
            "errors",
            "exclusions",
            "files",
            "layers",
            "resume",
            "schedules",
        ),
        "doubt": ("detector", "kept_detector", "non_digits", "real_digits", "verdicts"),
        "reports": ("grids",),
    }
    expected = {"companions"} | {f"companions.{package}" for package in plumbing}
    expected |= {f"companions.{package}.{name}" for package, names in plumbing.items() for name in names}
    assert result.stdout.strip() == str(sorted(expected))


def imported_modules(path):
    """The names of the modules a file imports, wherever in it (`from companions.reports import report` too)."""
    tree = ast.parse(Path(path).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def companion_files(path):
    """The files of companions/ that a file imports, as paths."""
    modules = (SCRIPT.parent / (name.replace(".", "/") + ".py") for name in imported_modules(path))
    return {module for module in modules if module.is_file() and "companions" in module.parts}


def test_nothing_the_script_imports_imports_the_script():
    """Imports flow one way: what the script imports from companions/, at its top or inside a
    function, never imports it back (so the script needs no sys.modules patch). Only the commands
    that use a trained model, which main imports by name, import the script."""
    plumbing, unread = set(), companion_files(SCRIPT)
    while unread:  # and what those import, in turn
        plumbing |= unread
        unread = set().union(*map(companion_files, unread)) - plumbing
    names = {f"{path.parent.name}/{path.stem}" for path in plumbing}
    assert {"training/command_line", "training/files", "reports/report", "reports/inside", "doubt/verdicts"} <= names
    for path in plumbing:
        assert "mnist_recognition" not in imported_modules(path), path
    assert "sys.modules" not in SCRIPT.read_text()


# Each folder of companions/ may import only the folders before it here: what a folder imports
# never imports it back.
LAYERS = ("training", "reports", "doubt", "using", "sharing", "experiments", "auditing")


def test_the_folders_of_companions_import_one_way():
    companions = SCRIPT.parent / "companions"
    assert sorted(path.name for path in companions.iterdir() if (path / "__init__.py").is_file()) == sorted(LAYERS)
    for path in companions.rglob("*.py"):
        for imported in companion_files(path):
            below = LAYERS.index(imported.parent.name) <= LAYERS.index(path.parent.name)
            assert below, f"{path.relative_to(companions)} imports {imported.relative_to(companions)}"
