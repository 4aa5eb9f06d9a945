"""The report page: self-contained, and rendered by a real browser."""
import re
import shutil

import pytest
from PIL import Image

import mnist_recognition as app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_the_report_holds_the_accuracy_settings_environment_and_every_figure(trained):
    out_dir, _ = trained
    page = (out_dir / "report.html").read_text()
    metrics = __import__("json").loads((out_dir / "metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.2f} % test accuracy</title>" in page
    assert f"{metrics['test_accuracy']:.3f} % of 300 test images right" in page
    for setting in ("recipe", "batch_size", "adam_betas", "label_smoothing"):
        assert f"<td>{setting}</td>" in page
    for what in ("torch", "torchvision", "CPU threads", "world size"):
        assert f"<td>{what}</td>" in page
    assert page.count("<img ") == len(app.FIGURES) and page.count("<figcaption>") == len(app.FIGURES)
    assert page.count("<tr><td>") >= 4 + 10  # a row per epoch and per class, among others


def test_the_report_refers_to_nothing_outside_itself(trained):
    page = (trained[0] / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # the embedded figures themselves
    assert not re.search(r"(https?:|file:|ftp:|//[a-z])", text, re.IGNORECASE)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text


def test_evaluate_writes_the_figures_and_a_report_for_its_model(trained, synthetic_data, tmp_path, cli):
    result = cli("evaluate", "--checkpoint", trained[0] / "lenet5_mnist.pt", "--data-dir", synthetic_data,
                 "--no-download", "--device", "cpu", "--out-dir", tmp_path)
    assert result.code == 0
    assert {path.name for path in tmp_path.iterdir()} == {"predictions.png", "confusion_matrix.png", "mistakes.png",
                                                           "report.html"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img ") == 3 and "lenet5_mnist.pt" in page and "Accuracy per class" in page


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="Chromium and its driver are not installed (apt-get install chromium chromium-driver); "
                           "the report was not checked in a real browser")
def test_a_real_browser_shows_every_figure_and_the_accuracy(trained, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get((trained[0] / "report.html").as_uri())
        widths = browser.execute_script(
            "return Array.from(document.images).map(image => image.complete ? image.naturalWidth : 0)")
        text = browser.find_element("tag name", "body").text
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert len(widths) == len(app.FIGURES) and all(width > 0 for width in widths), widths
    accuracy = __import__("json").loads((trained[0] / "metrics.json").read_text())["test_accuracy"]
    assert f"{accuracy:.3f} %" in text
    with Image.open(tmp_path / "report.png") as screenshot:
        colours = screenshot.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50  # text and figures, not a blank page


def test_evaluate_in_the_training_folder_embeds_only_its_own_figures(trained, synthetic_data, tmp_path, cli):
    """evaluate's default --out-dir is training's: the training curves left there are not its own."""
    shutil.copytree(trained[0], tmp_path / "outputs")
    result = cli("evaluate", "--checkpoint", tmp_path / "outputs" / "lenet5_mnist.pt", "--data-dir", synthetic_data,
                 "--no-download", "--device", "cpu", "--out-dir", tmp_path / "outputs")
    assert result.code == 0
    page = (tmp_path / "outputs" / "report.html").read_text()
    assert page.count("<img ") == 3 and "training_curves.png" not in page
