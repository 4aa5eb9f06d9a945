"""Settings and CLI: every flag documented, bad values refused before any work starts."""
import pytest

from conftest import run_cli


def test_help_lists_every_training_flag_with_its_default():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--data-dir", "--out-dir",
                 "--train-limit", "--test-limit", "--no-download", "--resume", "--log-interval"):
        assert flag in result.stdout
    assert "(default: 10)" in result.stdout and "(default: 64)" in result.stdout
    assert "evaluate" in result.stdout and "predict" in result.stdout


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_other_commands_have_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "--checkpoint" in result.stdout


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"], ["--epochs", "-3"], ["--batch-size", "0"], ["--lr", "0"], ["--lr", "-0.1"],
    ["--lr", "nan"], ["--train-limit", "0"], ["--test-limit", "-5"], ["--device", "tpu"],
    ["--epochs", "ten"],
])
def test_invalid_values_are_refused_with_exit_code_2(flags, tmp_path):
    result = run_cli(*flags, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_cuda_is_refused_where_there_is_none(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("--device", "cuda", "--out-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr
