"""export --html: one file that holds the model and a policy that allows no request, small; opened from
disk in Chromium with the network off, it reads drawings and photos as serve does, to 1e-4 in every
probability, for LeNet-5, its variants and a Fashion-MNIST model."""

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import QUICK, digits_side_by_side, paper_digit
from PIL import Image, ImageDraw
from test_serve import DIGIT_STROKES, NON_DIGIT_STROKES, a_number, post_image, start_serving, stop_serving, with_doubt

from companions.sharing import offline_page
from companions.using.trained import load_trained_model

PROBABILITY_TOLERANCE = 1e-4


def export_page(cli, checkpoint, out):
    result = cli("export", "--html", "--checkpoint", checkpoint, "--out", out)
    assert result.code == 0, result.log
    return out


def page_model(path):
    """The MODEL object the page holds."""
    return json.loads(re.search(r"const MODEL = (\{.*?\});</script>", path.read_text()).group(1))


# --- the file -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_file_holds_the_models_weights_a_policy_that_forbids_requests_and_is_small(trained, tmp_path, cli):
    checkpoint = trained[0] / "lenet5_mnist.pt"
    page = export_page(cli, checkpoint, tmp_path / "model.html")
    text = page.read_text()
    assert page.stat().st_size < 1_000_000
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy and "http" not in policy
    assert text.index("Content-Security-Policy") < text.index("<script")  # in force before any code runs
    model, payload = load_trained_model(checkpoint, torch.device("cpu"))
    held = page_model(page)
    conv1 = next(entry for entry in held["classifier"] if entry.get("name") == "conv1")
    weights = np.frombuffer(base64.b64decode(conv1["weight"]), dtype=np.float32)
    assert np.array_equal(weights, model.features[0].weight.detach().numpy().ravel())
    doubt = payload["doubt"]
    assert held["temperature"] == pytest.approx(doubt["temperature"]) and held["detector"]
    assert [entry.get("name") for entry in held["classifier"] if entry.get("name")] == [
        "conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "fc3"
    ]  # fmt: skip


@pytest.mark.slow
def test_the_default_file_is_beside_the_model_and_another_programs_file_is_left_alone(trained, tmp_path, cli):
    shutil.copy(trained[0] / "lenet5_mnist.pt", tmp_path / "lenet5_mnist.pt")
    assert cli("export", "--html", "--checkpoint", tmp_path / "lenet5_mnist.pt").code == 0
    assert (tmp_path / "lenet5_mnist.html").is_file()
    assert cli("export", "--html", "--checkpoint", tmp_path / "lenet5_mnist.pt").code == 0  # its own: replaced
    (tmp_path / "mine.html").write_text("<p>my page</p>")
    result = cli("export", "--html", "--checkpoint", tmp_path / "lenet5_mnist.pt", "--out", tmp_path / "mine.html")
    assert result.code == 2 and "is not a page that export wrote" in result.errors()[0]
    assert (tmp_path / "mine.html").read_text() == "<p>my page</p>"


# --- in Chromium, from disk, offline ----------------------------------------------------------------


def open_offline(browser, page):
    """The file opened from disk with the browser's network switched off."""
    from page_driving import WebDriverWait

    browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.readyState") == "complete")
    browser.get_log("performance")  # what loading the file itself logged
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []  # its scripts ran: a name declared twice, say, would stop the page's


def page_answer(browser, image_bytes):
    """What the page answers for an image file's bytes (as when one is dropped on it)."""
    return browser.execute_async_script(
        """const [data, done] = arguments;
        const bytes = Uint8Array.from(atob(data), character => character.charCodeAt(0));
        predictHere(new Blob([bytes])).then(done);""",
        base64.b64encode(image_bytes).decode(),
    )


def seen_pixels(reply):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["input"].split(",", 1)[1]))).convert("L"), dtype=int)


def assert_same_answer(offline, served, what):
    assert "error" not in offline and "error" not in served, (what, offline, served)
    assert offline["class"] == served["class"] and offline["verdict"] == served["verdict"], what
    assert offline["number"] == served["number"] and len(offline["digits"]) == len(served["digits"]), what
    for mine, theirs in zip(offline["digits"], served["digits"]):
        keys = ("class", "verdict", "box")
        assert [mine[key] for key in keys] == [theirs[key] for key in keys], what
        assert np.abs(np.subtract(mine["probabilities"], theirs["probabilities"])).max() <= PROBABILITY_TOLERANCE
    largest = np.abs(np.subtract(offline["probabilities"], served["probabilities"])).max()
    assert largest <= PROBABILITY_TOLERANCE, (what, largest)
    assert np.abs(seen_pixels(offline) - seen_pixels(served)).max() <= 1, what  # the same 28x28 input
    for mine, theirs in zip(offline["layers"], served["layers"]):
        assert mine["name"] == theirs["name"] and mine["shape"] == theirs["shape"]
        np.testing.assert_allclose(mine["values"], theirs["values"], atol=1e-3 * (1 + np.abs(theirs["values"]).max()))
    scale = 1 + np.abs(served["attribution"]).max()
    np.testing.assert_allclose(offline["attribution"], served["attribution"], atol=1e-3 * scale)
    return largest


def uneven(photo):
    """The photo under light that falls off across it, with the sensor's grain."""
    pixels = np.asarray(photo, dtype=np.float32)
    height, width = pixels.shape
    light = np.linspace(0, -60, width)[None, :] + np.linspace(0, -30, height)[:, None]
    grain = np.random.default_rng(0).normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels + light + grain, 0, 255).astype(np.uint8))


def touching():
    """A 1 and a 7 whose ink touches at the top: one piece of ink, that may be cut in two."""
    image = Image.new("L", (260, 200), 255)
    pen = ImageDraw.Draw(image)
    pen.line(((50, 30), (45, 170)), fill=0, width=12)
    pen.line(((50, 30), (190, 30), (120, 170)), fill=0, width=12, joint="curve")
    return image


def requests_made(browser):
    """Every URL the browser asked for since the last call, but data: and blob: URLs."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return [url for url in urls if not url.startswith(("data:", "blob:"))]


def drawn_and_compared(browser, port, strokes_by_name):
    """Each drawing drawn on the offline page, then the page's answer and serve's for its canvas;
    returns the largest difference in a probability."""
    from page_driving import By, Keys, canvas_png, draw, shown_answer

    largest = 0.0
    for name, strokes in strokes_by_name.items():
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        draw(browser, strokes)
        shown = shown_answer(browser)
        drawn = canvas_png(browser)
        status, served = post_image(port, drawn, "/predict?layers=1")
        assert status == 200 and shown == served["class"], name
        largest = max(largest, assert_same_answer(page_answer(browser, drawn), served, name))
    return largest


@pytest.mark.slow
def test_the_file_from_disk_offline_reads_drawings_and_photos_as_serve_does(trained, browser, tmp_path, cli):
    from page_driving import By

    # A temperature and thresholds of its own, so that each reaches the page's answers.
    checkpoint = with_doubt(trained[0] / "lenet5_mnist.pt", tmp_path / "model.pt", temperature=1.7, unsure_below=0.6)
    page = export_page(cli, checkpoint, tmp_path / "model.html")
    open_offline(browser, page)
    server = start_serving(checkpoint)
    try:
        # Some digits here (a fast model's file reads all ten below) and every thing that is no digit.
        drawings = {digit: DIGIT_STROKES[digit] for digit in (1, 4, 7, 8)}
        drawn_and_compared(browser, server.server_address[1], {**drawings, **NON_DIGIT_STROKES})
        drawn_and_compared(browser, server.server_address[1], {"a number": a_number([4, 1, 7])})
        photos = {f"paper {digit}": paper_digit(digit, seed=digit) for digit in (0, 3, 6, 9)}
        photos["dark paper 3"] = paper_digit(3, seed=1, ink=230, paper=40)
        photos["uneven light and grain 5"] = uneven(paper_digit(5, seed=5))
        photos["a number in uneven light"] = uneven(digits_side_by_side([2, 0, 2, 6], seed=7))
        photos["digits that touch"] = touching()
        for name, photo in photos.items():
            buffer = io.BytesIO()
            photo.save(buffer, format="PNG")
            _, served = post_image(server.server_address[1], buffer.getvalue(), "/predict?layers=1")
            assert_same_answer(page_answer(browser, buffer.getvalue()), served, name)
        blank = io.BytesIO()
        Image.new("L", (100, 100), 255).save(blank, format="PNG")
        status, served = post_image(server.server_address[1], blank.getvalue())
        assert status == 422 and page_answer(browser, blank.getvalue())["error"] == served["error"]
    finally:
        stop_serving(server)
    assert requests_made(browser) == []  # not one request while drawing and reading photos
    inside = browser.find_elements(By.CSS_SELECTOR, "#layers .layer")
    assert [row.get_attribute("data-layer") for row in inside][:2] == ["input", "conv1"]
    blocked = browser.execute_async_script(
        "const done = arguments[0]; fetch('http://127.0.0.1:9/').then(() => done('fetched'), () => done('refused'));"
    )
    assert blocked == "refused"


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [("--batch-norm", "--pool", "max"), ("--depth", "1", "--activation", "elu", "--dropout", "0.2")]
)
def test_a_variants_file_reads_drawings_as_serve_does(variant, synthetic_data, browser, tmp_path, cli):
    flags = (*QUICK, *variant, "--data-dir", synthetic_data, "--out-dir", tmp_path / "run")
    assert cli(*flags).code == 0
    checkpoint = tmp_path / "run" / "lenet5_mnist.pt"
    open_offline(browser, export_page(cli, checkpoint, tmp_path / "model.html"))
    server = start_serving(checkpoint)
    try:
        drawn_and_compared(browser, server.server_address[1], {digit: DIGIT_STROKES[digit] for digit in (0, 4, 7)})
    finally:
        stop_serving(server)


@pytest.mark.slow
def test_a_fashion_mnist_models_file_names_clothes(fashion_trained, browser, tmp_path, cli):
    from page_driving import By, draw, shown_answer

    checkpoint = fashion_trained[1] / "lenet5_mnist.pt"
    open_offline(browser, export_page(cli, checkpoint, tmp_path / "model.html"))
    draw(browser, DIGIT_STROKES[0])
    shown_answer(browser)
    named = browser.find_element(By.ID, "answer").text.splitlines()[0]
    assert named in app_classes("fashion-mnist")
    assert "Fashion-MNIST" in browser.find_element(By.ID, "model").text


def app_classes(name):
    from companions.training.datasets import DATASETS

    return DATASETS[name].classes


@pytest.mark.real_data
@pytest.mark.slow
def test_a_fast_models_file_reads_ten_drawn_digits_as_serve_does(browser, tmp_path, cli, real_fast):
    checkpoint = real_fast / "lenet5_mnist.pt"
    open_offline(browser, export_page(cli, checkpoint, tmp_path / "model.html"))
    server = start_serving(checkpoint)
    try:
        largest = drawn_and_compared(browser, server.server_address[1], DIGIT_STROKES)
    finally:
        stop_serving(server)
    assert largest <= PROBABILITY_TOLERANCE and requests_made(browser) == []


def test_a_layer_the_page_cannot_run_is_refused_in_one_line():
    with pytest.raises(offline_page.CliError, match="cannot run a GELU layer"):
        offline_page.module_entry(torch.nn.GELU())
