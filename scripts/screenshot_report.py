"""Screenshot a run's report.html in headless Chromium (the README's docs/report.png).

Writes the report first, renders it offline at a fixed width, and saves the full page as a
palette PNG (small enough for the repository). Needs the Debian packages chromium and
chromium-driver (.ci/system-packages) and selenium (the ``test`` extra).

    python scripts/screenshot_report.py runs/digits_cnn-digits-b0.2 docs/report.png [--width 1100]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from fga_search import write_report

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--max-height", type=int, default=0, help="crop the page to this height (0: all)")
    args = parser.parse_args()
    html_path, _ = write_report(args.run_dir)
    options = webdriver.ChromeOptions()
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={args.width},1000")
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(Path(html_path).as_uri())
            height = driver.execute_script("return document.documentElement.scrollHeight")
            if args.max_height:
                height = min(height, args.max_height)
            driver.set_window_size(args.width, height)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(args.out, optimize=True)
    print(f"{args.out}: {small.width}x{small.height}, {Path(args.out).stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
