"""Driving the page in a real browser as a person does: drawing with the mouse, waiting for the
answer. Only the browser tests import this module, and with it Selenium."""

import base64

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

__all__ = ["ActionChains", "By", "Keys", "WebDriverWait", "canvas_png", "draw", "open_page", "shown_answer"]


def draw(browser, strokes):
    """Each stroke as a press, moves and a release of the mouse, in canvas pixels from its top left."""
    canvas = browser.find_element(By.ID, "canvas")
    # Selenium's offsets count from the canvas's centre; the canvas's pixels are its CSS pixels.
    width, height = browser.execute_script("const c = arguments[0]; return [c.clientWidth, c.clientHeight];", canvas)
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        actions = ActionChains(browser, duration=10)
        actions.move_to_element_with_offset(canvas, round(x) - width // 2, round(y) - height // 2).click_and_hold()
        for next_x, next_y in rest:
            actions.move_by_offset(round(next_x) - round(x), round(next_y) - round(y))
            x, y = next_x, next_y
        actions.release().perform()


def shown_answer(browser):
    """The class the page shows once no answer is on its way (None for none or an error)."""
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "const a = document.getElementById('answer'); return !a.dataset.busy && a.textContent !== '';"
        )
    )
    shown = browser.find_element(By.ID, "answer").get_attribute("data-class")
    return None if shown is None else int(shown)


def canvas_png(browser):
    data_url = browser.execute_script("return document.getElementById('canvas').toDataURL('image/png');")
    return base64.b64decode(data_url.split(",", 1)[1])


def open_page(browser, port):
    browser.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.readyState") == "complete")
