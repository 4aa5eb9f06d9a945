#!/usr/bin/env python3
"""The page that `export --html` writes, opened from disk in headless Chromium with the network off:
its size, the time from opening it to its first answer, the time of each answer, and its agreement
with serve's answers (computed in this process, as POST /predict computes them) on the ten digits
the suite draws, drawn with the mouse as a person draws.

    python benchmarks/offline_page.py --checkpoint outputs/lenet5_mnist.pt --page outputs/lenet5_mnist.html

Needs Chromium and chromedriver (apt-get install chromium chromium-driver) and Selenium
(requirements-dev.txt).
"""

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import mnist_recognition as app  # noqa: E402
from companions.reports.report import cpu_name  # noqa: E402
from companions.using import serve  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("outputs") / app.MODEL_FILE)
    parser.add_argument("--page", type=Path, default=Path("outputs") / "lenet5_mnist.html")
    parser.add_argument("--screenshot", type=Path, default=None, help="save the page after the last digit as a PNG")
    return parser.parse_args()


def new_browser(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--window-size=1100,1400",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    return browser


def first_answer_ms(browser, page):
    """Opening the file, then drawing a 1 and waiting for its answer: (ms from navigation until the page
    is loaded, its weights decoded; ms until the answer)."""
    from page_driving import draw, shown_answer
    from test_serve import DIGIT_STROKES

    browser.get(page.resolve().as_uri())
    loaded = browser.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
    draw(browser, DIGIT_STROKES[1])
    shown_answer(browser)
    return loaded, browser.execute_script("return performance.now()")


def answer_ms(browser, png):
    """How long the page's own answer (preparation, network, detector, inside view) takes for one PNG."""
    import base64

    return browser.execute_async_script(
        """const [data, done] = arguments;
        const blob = new Blob([Uint8Array.from(atob(data), c => c.charCodeAt(0))]);
        const started = performance.now();
        predictHere(blob).then(reply => done([performance.now() - started, reply]));""",
        base64.b64encode(png).decode(),
    )


def main():
    from page_driving import Keys, canvas_png, draw, shown_answer
    from selenium.webdriver.common.by import By
    from test_serve import DIGIT_STROKES

    args = parse_args()
    server = serve.start_server(app.parse_args(["serve", "--checkpoint", str(args.checkpoint), "--port", "0"]))
    with tempfile.TemporaryDirectory() as profile:
        browser = new_browser(profile)
        try:
            loaded, first = first_answer_ms(browser, args.page)
            times, differences, same_class, same_verdict = [], [], 0, 0
            for strokes in DIGIT_STROKES.values():
                browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
                draw(browser, strokes)
                shown_answer(browser)
                png = canvas_png(browser)
                took, offline = answer_ms(browser, png)
                served = server.prediction_for(png, with_layers=True)
                times.append(took)
                differences.append(np.abs(np.subtract(offline["probabilities"], served["probabilities"])).max())
                same_class += offline["class"] == served["class"]
                same_verdict += offline["verdict"] == served["verdict"]
            if args.screenshot:
                browser.save_screenshot(str(args.screenshot))
        finally:
            browser.quit()
            server.server_close()
    version = browser.capabilities.get("browserVersion", "?")
    print(f"{args.page}: {args.page.stat().st_size:,} bytes; Chromium {version} headless, network off; {cpu_name()}")
    print(f"opened from disk: loaded, its weights decoded, after {loaded:.0f} ms; the first drawn digit's answer "
          f"after {first:.0f} ms (the drawing's pointer moves included)")  # fmt: skip
    print(f"one answer (prepare, network, detector, inside view): median {statistics.median(times):.0f} ms "
          f"over {len(times)} drawn digits")  # fmt: skip
    print(f"against serve: same class {same_class}/{len(times)}, same verdict {same_verdict}/{len(times)}, "
          f"largest difference in a probability {max(differences):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
