"""explorer.html in a headless Chromium (Debian's `chromium` and `chromium-driver`), driven by Selenium: for the
tests, and for the page's screenshot in results/ (one image of a split clicked and hovered):

    python -m tests.browser results/plots/explorer.html results/plots/explorer.png --dataset bloodmnist --split test
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.support.ui import WebDriverWait

from medvq.explorer import POINT_SIZE

WINDOW = (1640, 960)  # px: the map, its legend and colour bars, and the neighbour table side by side
LOAD_SECONDS = 60  # the real page's 25k points take a few seconds on a 2-core CPU

# Page px of every point: where BokehJS's own scales put it on the map's canvas.
POSITIONS = """
const plot = Bokeh.documents[0].get_model_by_name("map")
const view = Bokeh.index.get_one(plot)
const canvas = view.canvas_view.el.getBoundingClientRect()
const data = Bokeh.documents[0].get_model_by_name("points").data
return [Array.from(data.umap_x, x => canvas.left + view.frame.x_scale.compute(x)),
        Array.from(data.umap_y, y => canvas.top + view.frame.y_scale.compute(y))]
"""
# Every element of a class, inside the shadow roots where Bokeh draws its tooltips and table cells too.
FIND = """
const found = []
const search = root => {
  found.push(...root.querySelectorAll("." + arguments[0]))
  for (const element of root.querySelectorAll("*")) if (element.shadowRoot) search(element.shadowRoot)
}
search(document)
return found
"""


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A headless Chromium that keeps the page's console messages (`driver.get_log("browser")`)."""
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        raise RuntimeError("chromedriver is not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: webdriver.Chrome, page: Path) -> None:
    """Load the page from its file:// URL and wait until Bokeh has drawn it."""
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, LOAD_SECONDS).until(
        lambda d: d.execute_script("return window.Bokeh?.documents?.[0]?.is_idle === true")
    )


def point_positions(driver: webdriver.Chrome) -> np.ndarray:
    """(N, 2) page px of every point, in the order of the page's (and the Parquet's) rows."""
    return np.array(driver.execute_script(POSITIONS)).T


def crowding(positions: np.ndarray, reach: float) -> np.ndarray:
    """How many points (each itself included) lie within `reach` px across and up of each point: with reach half
    a point's size, those the pointer over it hits."""
    return cKDTree(positions).query_ball_point(positions, r=reach, p=np.inf, return_length=True)


def find(driver: webdriver.Chrome, css_class: str) -> list:
    return driver.execute_script(FIND, css_class)


def read_hover(driver: webdriver.Chrome, read: Callable, seconds: float):
    """`read(driver, thumbnail)` of the tooltip once it shows; read again if Bokeh redraws the tooltip meanwhile
    (the element read would be stale)."""

    def attempt(d: webdriver.Chrome):
        found = find(d, "medvq-hover")
        return (read(d, found[0]),) if found else None

    return WebDriverWait(driver, seconds, ignored_exceptions=[StaleElementReferenceException]).until(attempt)[0]


def _pointer(driver: webdriver.Chrome, row: int, click: bool) -> None:
    x, y = point_positions(driver)[row]
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
    if click:
        actions.pointer_action.click()
    actions.perform()


def hover(driver: webdriver.Chrome, row: int) -> None:
    _pointer(driver, row, click=False)


def click(driver: webdriver.Chrome, row: int) -> None:
    _pointer(driver, row, click=True)


def lone_row(driver: webdriver.Chrome, dataset: str | None = None, split: str | None = None) -> int:
    """The first row (of `dataset`'s `split`, if given) that the pointer over it hovers alone, wherever in its
    pixel the pointer lands."""
    data = driver.execute_script('return Bokeh.documents[0].get_model_by_name("points").data')
    alone = crowding(point_positions(driver), POINT_SIZE / 2 + 1) == 1
    return next(
        row
        for row, (name, part) in enumerate(zip(data["dataset"], data["split"]))
        if alone[row] and dataset in (None, name) and split in (None, part)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot of an explorer page: one image clicked and hovered.")
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", required=True)
    args = parser.parse_args()
    with chromium() as driver:
        open_page(driver, args.page)
        row = lone_row(driver, args.dataset, args.split)
        click(driver, row)
        hover(driver, row)
        WebDriverWait(driver, 10).until(lambda d: find(d, "medvq-hover"))
        driver.save_screenshot(str(args.png))
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
