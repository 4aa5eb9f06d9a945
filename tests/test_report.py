"""The report page: self-contained, and rendered by a real browser."""

import json
import os
import re
import sys

import pytest
import torch
from conftest import QUICK_WITH_FIGURES, train_quietly
from PIL import Image

from companions.reports import report

# What the README promises a training run's report shows, in this order.
TRAINING_FIGURES = [
    "training_curves.png",
    "confusion_matrix.png",
    "mistakes.png",
    "predictions.png",
    "calibration.png",
    "train_images.png",
    "test_images.png",
    "filters.png",
    "layer_maps.png",
]


def table(page, heading):
    """The rows of the report's table under `heading`, each a list of its cells' text."""
    [found] = re.findall(rf"<section><h2>{re.escape(heading)}</h2><table>(.*?)</table></section>", page)
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", found)]


def header(page, heading):
    [found] = re.findall(rf"<section><h2>{re.escape(heading)}</h2><table><tr>(.*?)</tr>", page)
    return re.findall(r"<th>(.*?)</th>", found)


def test_the_report_holds_the_accuracy_settings_environment_and_every_figure(trained):
    out_dir, _ = trained
    page = (out_dir / "report.html").read_text()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert f"{metrics['eval_accuracy']:.2f} % test accuracy</title>" in page
    assert f"{metrics['eval_accuracy']:.3f} % of 300 test images right after 4 epochs (" in page
    settings = dict(table(page, "Settings"))
    assert settings["recipe"] == "original" and settings["batch_size"] == "32" and settings["adam_betas"] == "0.9,0.999"
    environment = dict(table(page, "Environment"))
    assert {"torch", "torchvision", "CPU threads", "world size", "script sha256"} <= set(environment)
    assert re.findall(r'alt="([^"]+)"', page) == TRAINING_FIGURES and page.count("<figcaption>") == 9


def test_the_report_and_metrics_say_how_far_to_trust_the_answers(trained):
    out_dir, _ = trained
    page = (out_dir / "report.html").read_text()
    trust = json.loads((out_dir / "metrics.json").read_text())["trust"]
    saved = torch.load(out_dir / "lenet5_mnist.pt", weights_only=True)["doubt"]
    assert trust["temperature"] == saved["temperature"] > 0 and trust["unsure_below"] == saved["unsure_below"]
    assert trust["not_a_digit_above"] == saved["not_a_digit_above"] and "detector" in saved
    assert sum(trust["verdicts"].values()) == 300 and set(trust["verdicts"]) == {"sure", "not_sure", "not_a_digit"}
    assert 0 <= trust["ece"] <= 1 and 0 <= trust["ece_before"] <= 1 and 0 <= trust["coverage"] <= 1
    rows = dict(table(page, "How far to trust it (test images)"))
    assert rows["temperature"] == f"{trust['temperature']:.3f}"
    assert rows["verdict not a digit"] == str(trust["verdicts"]["not_a_digit"])
    assert rows["ECE before / after (15 bins)"] == f"{100 * trust['ece_before']:.2f} % / {100 * trust['ece']:.2f} %"


def test_the_reports_tables_have_a_row_per_epoch_and_per_class(trained):
    out_dir, _ = trained
    page = (out_dir / "report.html").read_text()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert header(page, "Per epoch") == ["epoch", "loss", "train accuracy", "test loss", "test accuracy", "seconds"]
    epochs = table(page, "Per epoch")
    assert [row[0] for row in epochs] == ["1", "2", "3", "4"]  # the trained fixture runs 4 epochs
    assert epochs[-1][4] == f"{metrics['eval_accuracy']:.2f}"
    classes = table(page, "Accuracy per class")
    assert [row[:2] for row in classes] == [[str(digit), str(digit)] for digit in range(10)]
    assert sum(int(row[2]) for row in classes) == 300


def test_the_report_the_metrics_and_the_log_hold_each_layers_cost_and_the_totals(trained):
    out_dir, result = trained
    page = (out_dir / "report.html").read_text()
    assert header(page, "Layers (batch 32)") == [
        "layer",
        "output",
        "parameters",
        "multiply-adds per image",
        "activations",
    ]
    rows = table(page, "Layers (batch 32)")
    assert [row[0] for row in rows] == ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3", "total"]
    assert rows[0][:4] == ["conv1", "6x28x28", "156", "117,600"] and rows[-1][2:4] == ["61,706", "416,520"]
    layers = json.loads((out_dir / "metrics.json").read_text())["layers"]
    assert layers["batch_size"] == 32 and len(layers["rows"]) == 7
    assert layers["totals"] == {"parameters": 61_706, "multiply_adds": 416_520, "activation_bytes": 32 * 4 * 8094}
    assert layers["rows"][2] == {
        "name": "conv2",
        "output_shape": [16, 10, 10],
        "parameters": 2416,
        "multiply_adds": 240_000,
        "activation_bytes": 32 * 4 * 1600,
    }
    logged = [line for line in result.stderr.splitlines() if "61,706" in line and "416,520" in line]
    assert len(logged) == 1 and logged[0].split("|")[-1].split()[:3] == ["total", "61,706", "416,520"]


def test_the_report_refers_to_nothing_outside_itself(trained):
    page = (trained[0] / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # the embedded figures themselves
    assert not re.search(r"(https?:|file:|ftp:|//[a-z])", text, re.IGNORECASE)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text


@pytest.mark.slow
def test_evaluate_writes_the_figures_and_a_report_for_its_model(trained, synthetic_data, tmp_path, cli):
    result = cli(
        "evaluate",
        "--checkpoint",
        trained[0] / "lenet5_mnist.pt",
        "--data-dir",
        synthetic_data,
        "--no-download",
        "--device",
        "cpu",
        "--out-dir",
        tmp_path,
    )
    assert result.code == 0
    assert {path.name for path in tmp_path.iterdir()} == {
        "predictions.png",
        "confusion_matrix.png",
        "mistakes.png",
        "calibration.png",
        "report.html",
        "metrics.json",
    }
    page = (tmp_path / "report.html").read_text()
    figures = ["confusion_matrix.png", "mistakes.png", "predictions.png", "calibration.png"]
    assert re.findall(r'alt="([^"]+)"', page) == figures
    assert "lenet5_mnist.pt" in page and len(table(page, "Accuracy per class")) == 10
    assert "<h2>Per epoch</h2>" not in page  # evaluate has no epochs to show


@pytest.mark.slow
def test_a_real_browser_shows_every_figure_and_the_accuracy(trained, tmp_path, browser):
    browser.get((trained[0] / "report.html").as_uri())
    widths = browser.execute_script(
        "return Array.from(document.images).map(image => image.complete ? image.naturalWidth : 0)"
    )
    text = browser.find_element("tag name", "body").text
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert len(widths) == len(TRAINING_FIGURES) and all(width > 0 for width in widths), widths
    accuracy = json.loads((trained[0] / "metrics.json").read_text())["eval_accuracy"]
    assert f"{accuracy:.3f} %" in text
    with Image.open(tmp_path / "report.png") as screenshot:
        colours = screenshot.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text and figures, not a blank page


@pytest.mark.slow
def test_a_one_epoch_report_says_epoch(synthetic_data, tmp_path, cli):
    assert (
        cli(
            "--epochs",
            1,
            "--train-limit",
            64,
            "--test-limit",
            32,
            "--no-download",
            "--device",
            "cpu",
            "--data-dir",
            synthetic_data,
            "--out-dir",
            tmp_path,
        ).code
        == 0
    )
    assert " test images right after 1 epoch (" in (tmp_path / "report.html").read_text()


# --- the figures in two processes ------------------------------------------------------------------


def write_pid(path):
    path.write_text(str(os.getpid()))


def fail(path):
    raise OSError(28, "No space left on device")


@pytest.mark.skipif(sys.platform != "linux", reason="the figures are drawn in a forked copy on Linux only")
def test_the_evaluation_figures_are_drawn_by_a_copy_of_the_process_meanwhile(tmp_path):
    with report.drawn_beside(write_pid, tmp_path / "pid"):
        assert not (tmp_path / "here").exists()
        (tmp_path / "here").write_text("the block ran")
    assert int((tmp_path / "pid").read_text()) != os.getpid()


def test_where_the_copy_fails_this_process_draws_and_reports_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "exit_code_of", lambda draw, *args: sys.exit(1))
    with report.drawn_beside(write_pid, tmp_path / "pid"):
        pass
    assert int((tmp_path / "pid").read_text()) == os.getpid()
    with pytest.raises(OSError), report.drawn_beside(fail, tmp_path):
        pass


@pytest.mark.slow
def test_a_run_writes_the_same_figures_whichever_process_draws_them(synthetic_data, tmp_path, monkeypatch):
    flags = (*QUICK_WITH_FIGURES, "--epochs", 1, "--train-limit", 256, "--data-dir", synthetic_data)
    train_quietly(*flags, "--out-dir", tmp_path / "two")
    monkeypatch.setattr(report, "exit_code_of", lambda draw, *args: sys.exit(1))
    train_quietly(*flags, "--out-dir", tmp_path / "one")
    for name in TRAINING_FIGURES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
