"""compare: the variants over paired seeds, each run a plain training run, a rerun that trains nothing,
a run killed halfway that ends as an uninterrupted one, and shards that add up."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import script_command
from scipy import stats

import mnist_recognition as app
from companions.experiments import compare

FLAGS = ("--recipe", "fast", "--validation", 300, "--no-download", "--device", "cpu")
VARY = ("--vary", "pool=max", "optimizer=sgd,momentum=0.9,lr=0.05")


def answer(out_dir):
    """compare.json without what may differ between two folders: the numbers only."""
    summary = json.loads((out_dir / "compare.json").read_text())
    summary["baseline"] = [flag for flag in summary["baseline"] if str(out_dir) not in flag]
    return summary


# --- the specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, flags",
    [
        ("pool=max", ("--pool", "max")),
        ("batch_norm=true", ("--batch-norm",)),
        ("batch-norm=false", ()),
        ("optimizer=sgd,momentum=0.9", ("--optimizer", "sgd", "--momentum", "0.9")),
        ("widths=8,20,100,50,dropout=0.3", ("--widths", "8,20,100,50", "--dropout", "0.3")),
        ("depth=2", ("--depth", "2")),
    ],
)
def test_a_spec_is_settings_joined_by_commas(spec, flags):
    variant = compare.parse_spec(spec)
    assert (variant.name, variant.flags) == (spec, flags)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("pool", "write each setting as name=value"),
        ("nosuch=1", "nosuch is not a setting compare can vary"),
        ("out_dir=x", "out_dir is not a setting compare can vary"),
        ("batch_norm=maybe", "write batch_norm=true or batch_norm=false"),
        ("momentum=0.9", "--momentum is for --optimizer sgd or rmsprop"),
        ("pool=round", "not a value this program takes"),
    ],
)
def test_a_bad_spec_is_one_line_naming_it_before_anything_is_written(spec, says, tmp_path, cli):
    result = cli("compare", "--vary", spec, "--out-dir", tmp_path / "compare", "--validation", 300)
    assert result.code == 2 and not (tmp_path / "compare").exists()
    assert f"--vary {spec}" in result.errors()[-1] and says in result.errors()[-1]


def test_test_and_validation_together_are_refused(tmp_path, cli):
    result = cli("compare", "--test", "--validation", 300, "--out-dir", tmp_path / "compare")
    assert result.code == 2 and "give one of them" in result.errors()[0]


def test_the_baseline_measures_on_a_validation_split_unless_told_otherwise():
    assert compare.baseline_flags(app.parse_args(["compare", "--recipe", "fast"])) == [
        "--recipe",
        "fast",
        "--validation",
        "10000",
    ]
    assert compare.baseline_flags(app.parse_args(["compare", "--test"]))[-2:] == ["--validation", "0"]
    assert compare.baseline_flags(app.parse_args(["compare", "--validation", "5000"])) == ["--validation", "5000"]


# --- whole comparisons on the synthetic data ------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tmp_path_factory, synthetic_data):
    """Two variants, 3 seeds, 2 workers, uninterrupted: (its folder, the flags it ran with)."""
    out_dir = tmp_path_factory.mktemp("compared") / "compare"
    flags = (*FLAGS, "--data-dir", synthetic_data, *VARY, "--seeds", 3)
    assert app.main(["compare", *map(str, flags), "--workers", "2", "--out-dir", str(out_dir)]) == 0
    return out_dir, flags


@pytest.mark.slow
def test_compare_writes_each_variants_numbers_and_its_verdict(compared):
    out_dir, _ = compared
    summary = answer(out_dir)
    assert [entry["name"] for entry in summary["variants"]] == [
        "baseline",
        "pool=max",
        "optimizer=sgd,momentum=0.9,lr=0.05",
    ]
    assert summary["split"] == "validation" and summary["seeds"] == [0, 1, 2]
    baseline = summary["variants"][0]["accuracies"]
    assert [entry["settings"] for entry in summary["variants"]] == [
        {},
        {"pool": "max"},
        {"optimizer": "sgd", "momentum": "0.9", "lr": "0.05"},
    ]
    for entry in summary["variants"]:
        assert len(entry["accuracies"]) == 3 and {"mean", "sd", "median", "ci95", "ensemble_accuracy"} <= set(entry)
    for entry in summary["variants"][1:]:
        assert entry["p_value"] == pytest.approx(stats.ttest_rel(entry["accuracies"], baseline).pvalue)
        assert {"difference", "p_holm", "verdict"} <= set(entry)
    assert {"compare.json", "compare.md", "compare.html", "compare.png", "metrics.json"} <= {
        p.name for p in out_dir.iterdir()
    }
    page = (out_dir / "compare.html").read_text()
    assert "pool=max" in page and "data:image/png;base64," in page
    markdown = (out_dir / "compare.md").read_text()
    assert markdown.count("\n| ") == 1 + 3  # the header and a row per variant


@pytest.mark.slow
def test_each_run_is_a_plain_training_run_with_one_thread(compared, tmp_path, cli):
    out_dir, flags = compared
    result = json.loads((out_dir / "results" / "pool_max-seed-1.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: OMP_NUM_THREADS=1 on the command line
    try:
        plain = [str(flag) for flag in flags if str(flag) not in ("--vary", *VARY[1:], "--seeds", "3")]
        assert cli(*plain, "--pool", "max", "--seed", 1, "--out-dir", tmp_path / "plain").code == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert result["accuracy"] == metrics["eval_accuracy"]  # to the last digit
    confusion = np.array(metrics["confusion_matrix"])
    assert result["class_correct"] == confusion.diagonal().tolist()


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_gives_the_same_answer(compared, cli):
    out_dir, flags = compared
    before = {path: path.stat().st_mtime_ns for path in (out_dir / "results").iterdir()}
    first = answer(out_dir)
    result = cli("compare", *flags, "--workers", 2, "--out-dir", out_dir)
    assert result.code == 0 and "9 of 9 runs have their result already" in result.log
    assert {path: path.stat().st_mtime_ns for path in (out_dir / "results").iterdir()} == before
    assert answer(out_dir) == first


@pytest.mark.slow
def test_a_comparison_killed_halfway_ends_as_an_uninterrupted_one(compared, tmp_path, background, cli):
    out_dir, flags = compared
    job = background(script_command("compare", *flags, "--workers", 1, "--out-dir", tmp_path / "compare"))
    job.wait_for_line("[4/9]", timeout=120)
    os.killpg(job.process.pid, signal.SIGKILL)
    job.process.wait()
    assert not (tmp_path / "compare" / "compare.json").exists()
    result = cli("compare", *flags, "--workers", 2, "--out-dir", tmp_path / "compare")
    assert result.code == 0 and "runs have their result already" in result.log
    assert "[9/9]" in result.log  # each run the workers finish is logged as it ends
    assert answer(tmp_path / "compare") == answer(out_dir)


@pytest.mark.slow
def test_two_shards_add_up_to_one_unsharded_comparison(compared, tmp_path, cli):
    out_dir, flags = compared
    first = cli("compare", *flags, "--shard", "0/2", "--workers", 1, "--out-dir", tmp_path / "compare")
    assert first.code == 0 and "compare.json is written once all have" in first.log
    assert len(list((tmp_path / "compare" / "results").glob("*.json"))) == 5  # runs 0, 2, 4, 6 and 8 of 9
    second = cli("compare", *flags, "--shard", "1/2", "--workers", 1, "--out-dir", tmp_path / "compare")
    assert second.code == 0 and answer(tmp_path / "compare") == answer(out_dir)


@pytest.mark.slow
def test_a_folder_of_another_baseline_is_refused(compared, cli):
    out_dir, flags = compared
    result = cli("compare", *flags, "--lr", "0.01", "--out-dir", out_dir)
    assert result.code == 2 and "holds runs of another baseline" in result.errors()[0]


# --- several models in evaluate: their ensemble ----------------------------------------------------


@pytest.mark.slow
def test_evaluate_measures_each_model_and_their_ensemble(compared, cli):
    out_dir, flags = compared
    data_dir = flags[flags.index("--data-dir") + 1]
    checkpoints = [out_dir / "runs" / f"baseline-seed-{seed}" / "lenet5_mnist.pt" for seed in range(3)]
    result = cli("evaluate", "--checkpoint", *checkpoints, "--data-dir", data_dir, "--no-download", "--device", "cpu")
    assert result.code == 0 and "the ensemble of 3 models" in result.log
    metrics = json.loads((checkpoints[0].parent / "evaluation-ensemble" / "metrics.json").read_text())
    assert [entry["checkpoint"] for entry in metrics["models"]] == [str(path) for path in checkpoints]
    # The ensemble's answers are the mean of the models' probabilities, recomputed here.
    images, labels = app.normalised_split(data_dir, app.DATASETS["mnist"], False, None, torch.device("cpu"))
    from companions.using.trained import load_trained_model

    with torch.no_grad():
        mean = torch.stack(
            [torch.softmax(load_trained_model(path, torch.device("cpu"))[0](images), 1) for path in checkpoints]
        ).mean(0)
    assert metrics["eval_accuracy"] == pytest.approx(100 * (mean.argmax(1) == labels).float().mean().item())


# --- on real MNIST, as the README runs it ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_on_real_mnist_the_baseline_seed_0_is_a_plain_run_to_the_last_digit(tmp_path, cli, real_mnist):
    flags = (
        "--recipe",
        "fast",
        "--train-limit",
        5000,
        "--no-download",
        "--device",
        "cpu",
        "--data-dir",
        real_mnist,
    )
    result = cli("compare", *flags, "--vary", "pool=max", "--seeds", 2, "--out-dir", tmp_path / "compare")
    assert result.code == 0
    summary = json.loads((tmp_path / "compare" / "compare.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(*flags, "--validation", 10000, "--out-dir", tmp_path / "plain").code == 0
    finally:
        torch.set_num_threads(threads)
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["eval_accuracy"]
    assert summary["variants"][0]["accuracies"][0] == plain
