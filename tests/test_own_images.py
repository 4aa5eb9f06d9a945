"""companions/using/own_images.py, and what uses it: serve --collect (POST /examples), evaluate --images
and finetune on folders of labelled images."""

import errno
import io
import json
import threading

import pytest
from conftest import labelled_folder, paper_digit
from PIL import Image
from test_serve import png_bytes, request, start_serving, stop_serving

import mnist_recognition as app
from companions.using import own_images

MNIST_DATA = app.DATASETS["mnist"]


@pytest.fixture
def collecting(trained, tmp_path):
    """(port, folder) of a server that saves examples into a new folder."""
    folder = tmp_path / "mine"
    server = start_serving(trained[0] / "lenet5_mnist.pt", "--collect", folder)
    yield server.server_address[1], folder
    stop_serving(server)


def post_example(port, label, body):
    status, headers, answer = request(port, "POST", f"/examples?label={label}", body)
    return status, json.loads(answer)


def files_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# --- POST /examples ------------------------------------------------------------------------------------


def test_a_labelled_image_is_saved_as_sent_under_its_class(collecting):
    port, folder = collecting
    drawing = png_bytes(paper_digit(3, size=200))
    status, answer = post_example(port, 3, drawing)
    assert status == 201
    assert answer["file"] == str(folder / "3" / "1.png") and answer["class"] == 3 and answer["name"] == "3"
    assert (folder / "3" / "1.png").read_bytes() == drawing  # the original, not the 28x28
    assert answer["counts"]["3"] == 1 and sum(answer["counts"].values()) == 1
    status, answer = post_example(port, 3, drawing)
    assert status == 201 and answer["file"].endswith("3/2.png") and answer["counts"]["3"] == 2
    status, _, listed = request(port, "GET", "/examples")
    assert status == 200 and json.loads(listed)["counts"]["3"] == 2


def test_a_jpeg_is_kept_pixel_for_pixel_as_png(collecting):
    port, folder = collecting
    photo = png_bytes(paper_digit(5, size=200).convert("RGB"), format="JPEG")
    assert post_example(port, 5, photo)[0] == 201
    with Image.open(folder / "5" / "1.png") as saved, Image.open(io.BytesIO(photo)) as sent:
        assert saved.format == "PNG" and saved.tobytes() == sent.tobytes() and saved.mode == sent.mode


def test_numbers_are_never_reused_and_nothing_is_overwritten(collecting):
    port, folder = collecting
    (folder / "7").mkdir(parents=True)
    (folder / "7" / "4.png").write_bytes(b"a file of the person's own")
    status, answer = post_example(port, 7, png_bytes(paper_digit(7, size=120)))
    assert status == 201 and answer["file"].endswith("7/5.png")
    assert (folder / "7" / "4.png").read_bytes() == b"a file of the person's own"


@pytest.mark.slow
def test_concurrent_examples_lose_nothing(collecting):
    port, folder = collecting
    bodies = [png_bytes(paper_digit(2, seed=seed, size=120)) for seed in range(24)]
    answers = [None] * len(bodies)

    def send(index):
        answers[index] = post_example(port, 2, bodies[index])

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(status == 201 for status, _ in answers)
    assert sorted(answer["file"] for _, answer in answers) == sorted(
        str(folder / "2" / f"{n}.png") for n in range(1, 25)
    )
    assert sorted((folder / "2" / f"{n}.png").read_bytes() for n in range(1, 25)) == sorted(bodies)
    assert files_in(folder) == sorted(f"2/{n}.png" for n in range(1, 25))  # no temporary file left


BAD_EXAMPLES = {
    "no label": ("/examples", lambda: png_bytes(paper_digit(1)), 400, "?label=K"),
    "an unknown label": ("/examples?label=10", lambda: png_bytes(paper_digit(1)), 400, "?label=K"),
    "a label that is no number": ("/examples?label=one", lambda: png_bytes(paper_digit(1)), 400, "?label=K"),
    "not an image": ("/examples?label=1", lambda: b"just some text", 400, "not an image"),
    "an empty body": ("/examples?label=1", lambda: b"", 400, "empty"),
}


@pytest.mark.parametrize("case", BAD_EXAMPLES)
def test_a_bad_example_gets_its_4xx_and_leaves_nothing(case, collecting):
    port, folder = collecting
    path, body, expected, reason = BAD_EXAMPLES[case]
    status, _, answer = request(port, "POST", path, body())
    assert status == expected and reason in json.loads(answer)["error"]
    assert not folder.exists() or files_in(folder) == []


def test_without_collect_examples_are_refused(trained):
    server = start_serving(trained[0] / "lenet5_mnist.pt")
    try:
        status, answer = post_example(server.server_address[1], 1, png_bytes(paper_digit(1)))
        assert status == 403 and "--collect" in answer["error"]
    finally:
        stop_serving(server)


def test_a_folder_that_cannot_be_written_is_refused_and_left_as_it_was(trained, tmp_path):
    in_the_way = tmp_path / "a file, not a folder"
    in_the_way.write_text("the person's")
    server = start_serving(trained[0] / "lenet5_mnist.pt", "--collect", in_the_way)
    try:
        status, answer = post_example(server.server_address[1], 1, png_bytes(paper_digit(1)))
        assert status == 403 and "cannot save into" in answer["error"]
        assert in_the_way.read_text() == "the person's"
    finally:
        stop_serving(server)


def test_a_full_disk_is_answered_507_and_leaves_no_file(collecting, monkeypatch):
    port, folder = collecting

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(own_images.os, "fsync", no_space)
    status, answer = post_example(port, 4, png_bytes(paper_digit(4)))
    assert status == 507 and "no space is left" in answer["error"]
    assert files_in(folder) == []


def test_a_disk_that_is_full_from_the_start_is_answered_507(collecting, refusing):
    port, folder = collecting
    refusing.full(folder)
    status, answer = post_example(port, 4, png_bytes(paper_digit(4)))
    assert status == 507 and "no space is left" in answer["error"]
    assert not folder.exists() or files_in(folder) == []


def test_a_read_only_folder_is_answered_403_and_left_as_it_was(collecting, refusing):
    port, folder = collecting
    folder.mkdir()
    refusing.read_only(folder)
    status, answer = post_example(port, 4, png_bytes(paper_digit(4)))
    assert status == 403 and f"cannot save into {folder / '4'}: Permission denied" in answer["error"]
    assert files_in(folder) == []


@pytest.mark.parametrize("label", ["%C2%B2", "%D9%A1", "1%C2%B9", "-1", "10", "", "one"])
def test_a_label_that_is_not_a_class_number_in_digits_0_to_9_gets_400(label, collecting):
    """'²' passes str.isdigit() and then fails int(); Arabic-Indic '١' passes both: each needs the guard."""
    port, folder = collecting
    status, answer = post_example(port, label, png_bytes(paper_digit(1)))
    assert status == 400 and "?label=K" in answer["error"]
    assert not folder.exists() or files_in(folder) == []


# --- in a real browser -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_drawn_digit_labelled_on_the_page_is_saved_and_counted(trained, tmp_path, browser):
    from page_driving import ActionChains, By, WebDriverWait

    folder = tmp_path / "mine"
    server = start_serving(trained[0] / "lenet5_mnist.pt", "--collect", folder)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, '#counts span[data-class="7"]'))
        assert browser.find_element(By.CSS_SELECTOR, '#counts span[data-class="7"]').text.endswith("7: 0")
        canvas = browser.find_element(By.ID, "canvas")
        stroke = ActionChains(browser).move_to_element_with_offset(canvas, -70, -80).click_and_hold()
        for x, y in ((70, -80), (-10, 90)):  # a 7: the bar, then the stem
            stroke = stroke.move_to_element_with_offset(canvas, x, y)
        stroke.release().perform()
        wait.until(lambda driver: driver.find_element(By.ID, "answer").get_attribute("data-class") is not None)
        assert browser.find_element(By.ID, "label").is_displayed()
        browser.find_element(By.CSS_SELECTOR, '#choices button[data-class="7"]').click()
        wait.until(lambda driver: "Saved as 7" in driver.find_element(By.ID, "saved").text)
        assert files_in(folder) == ["7/1.png"]
        with Image.open(folder / "7" / "1.png") as saved:
            assert saved.size == (700, 280)  # the canvas as drawn
        assert browser.find_element(By.CSS_SELECTOR, '#counts span[data-class="7"]').text.endswith("7: 1")
    finally:
        stop_serving(server)


# --- reading a folder: evaluate --images and finetune ---------------------------------------------------


def evaluate_images(cli, trained, folder, out_dir):
    return cli(
        "evaluate",
        "--checkpoint",
        trained[0] / "lenet5_mnist.pt",
        "--images",
        folder,
        "--device",
        "cpu",
        "--out-dir",
        out_dir,
    )


@pytest.mark.slow
def test_evaluate_images_measures_the_folder_and_writes_its_report(trained, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine")
    result = evaluate_images(cli, trained, folder, tmp_path / "out")
    assert result.code == 0, result.log
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_images"] == 60 and metrics["class_images"] == {str(d): 6 for d in range(10)}
    line = f"Accuracy of the network on the 60 images in {folder}: {metrics['eval_accuracy']:.3f} %"
    assert line in result.log and "Accuracy per class: 0 " in result.log
    assert sum(map(sum, metrics["confusion_matrix"])) == 60
    for name in ("confusion_matrix.png", "mistakes.png", "predictions.png", "report.html"):
        assert (tmp_path / "out" / name).is_file()


@pytest.mark.slow
def test_evaluate_images_names_each_problem_and_reads_the_rest(trained, tmp_path, cli):
    folder = labelled_folder(tmp_path / "mine", per_class=2, classes=(1, 2))
    (folder / "eleven").mkdir()
    (folder / "3").mkdir()
    (folder / "2" / "broken.png").write_text("not an image")
    result = evaluate_images(cli, trained, folder, tmp_path / "out")
    assert result.code == 1
    errors = result.errors()
    assert any(f"{folder / 'eleven'}: not a class of MNIST" in line for line in errors)
    assert any(f"{folder / '3'}: no images in it" in line for line in errors)
    assert any(f"{folder / '2' / 'broken.png'}: not an image" in line for line in errors)
    assert "Accuracy of the network on the 4 images in" in result.log
    assert "3 (none)" in result.log  # a class without images has no accuracy


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_evaluate_images_of_nothing_is_one_error(case, trained, tmp_path, cli):
    folder = tmp_path / "mine"
    if case == "empty":
        folder.mkdir()
    result = evaluate_images(cli, trained, folder, tmp_path / "out")
    assert result.code == (2 if case == "missing" else 1)
    assert len(result.errors()) == 1 and f"--images {folder}" in result.errors()[0]


def test_folder_names_are_class_names_a_path_can_hold():
    fashion = app.DATASETS["fashion-mnist"]
    assert own_images.folder_name("T-shirt/top") == "T-shirt-top"
    assert [own_images.folder_name(name) for name in MNIST_DATA.classes] == list("0123456789")
    assert len({own_images.folder_name(name) for name in fashion.classes}) == 10
