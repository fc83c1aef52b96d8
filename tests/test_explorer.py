"""explorer.html in a real headless Chromium: it opens from a file:// URL with no console errors, draws one point
per Parquet row, shows the hovered row's own image beside its reconstruction, and lists on a click the
neighbours that jobs/neighbours.py finds."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from selenium.webdriver.support.ui import WebDriverWait

from medvq import plots
from medvq.config import Config
from medvq.data import load_split, rgb
from medvq.encode import RECONSTRUCTION, THUMB, thumbnail_images
from medvq.explorer import POINT_SIZE, tile_positions
from medvq.latent_space import NEIGHBOURS
from medvq.neighbours import neighbour_table
from medvq.report import RECONSTRUCTIONS_FILE, ROW_KEY
from tests.browser import chromium, click, crowding, find, hover, lone_row, open_page, point_positions, read_hover
from tests.conftest import TINY
from tests.test_plots import encoded_run

WAIT_SECONDS = 10
# Points each renderer of the legend draws (one per dataset and split), as BokehJS filtered them.
DRAWN = """
return Bokeh.documents[0].get_model_by_name("legend").items.map(item => item.renderers[0].view.indices.count)
"""
POINTABLE = 'return Bokeh.documents[0].get_model_by_name("pointer").view.indices.count'

BACKGROUND = "const style = getComputedStyle(arguments[0]); return [style.backgroundImage, style.backgroundPosition]"


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_root) -> Path:
    """A run folder whose figures, the explorer among them, plots.draw_run has drawn."""
    run = encoded_run(tmp_path_factory.mktemp("explorer") / "run", Config(**{**TINY, "data_root": str(synthetic_root)}))
    assert "explorer.html" in [Path(path).name for path in plots.draw_run(run)]
    return run


@pytest.fixture(scope="module")
def page(run):
    with chromium() as driver:
        open_page(driver, run / "plots" / "explorer.html")
        yield driver


@pytest.fixture(scope="module")
def latents(run) -> pd.DataFrame:
    return pd.read_parquet(run / "latents")


@pytest.fixture(scope="module")
def lone_point(page) -> int:
    """A row the pointer over it hovers alone."""
    return lone_row(page)


def points_data(page, name: str) -> pd.DataFrame:
    return pd.DataFrame(page.execute_script(f'return Bokeh.documents[0].get_model_by_name("{name}").data'))


def tile_offset(page, element) -> tuple[int, int]:
    """Where in its sprite sheet an element's tile is: (x, y) px, from its CSS background position."""
    position = page.execute_script(BACKGROUND, element)[1]
    x, y = (-int(value.removesuffix("px")) for value in position.split())
    return x, y


def shown_tile(page, element) -> np.ndarray:
    """The (THUMB, width, 3) pixels an element of the page shows: its sprite sheet, cut at its offset."""
    data = re.fullmatch(r'url\("data:image/webp;base64,(.+)"\)', page.execute_script(BACKGROUND, element)[0]).group(1)
    x, y = tile_offset(page, element)
    width = int(element.value_of_css_property("width").removesuffix("px"))
    sheet = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return sheet[y : y + THUMB, x : x + width]


def test_the_page_opens_from_disk_and_draws_one_point_per_parquet_row(run, page, latents):
    html = (run / "plots" / "explorer.html").read_text()
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)=", html)  # every script and style is inlined
    data = points_data(page, "points")
    assert sorted(zip(data["dataset"], data["split"], data["index"])) == sorted(
        zip(latents["dataset"], latents["split"], latents["index"])
    )
    assert sum(page.execute_script(DRAWN)) == page.execute_script(POINTABLE) == len(latents)
    for mode in (1, 2, 0):  # class, PSNR, back to dataset: each recolours every point without an error
        page.execute_script(f'Bokeh.documents[0].get_model_by_name("colour").active = {mode}')
    assert [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"] == []


def hover_text(driver, thumb) -> str:
    return driver.execute_script("return arguments[0].parentElement.innerText", thumb)


def test_hovering_a_point_shows_that_rows_image_beside_its_reconstruction(
    run, page, latents, lone_point, synthetic_root
):
    hover(page, lone_point)
    tile, text = read_hover(
        page, lambda driver, thumb: (shown_tile(driver, thumb).astype(int), hover_text(driver, thumb)), WAIT_SECONDS
    )
    record = latents.iloc[lone_point]
    images = rgb(load_split(record["dataset"], record["split"], synthetic_root)[0])
    errors = np.abs(images - tile[:, :THUMB]).mean(axis=(1, 2, 3))  # against every image of its split
    # The sprite sheets are lossy WebP: a few levels of 255 per pixel, more for a busy image (up to 3.4 seen)
    assert errors.argmin() == record["index"] and errors.min() < 5
    thumbnails = pd.read_parquet(run / "latents" / RECONSTRUCTIONS_FILE).set_index(ROW_KEY)[RECONSTRUCTION]
    recon = thumbnail_images(thumbnails.loc[[tuple(record[ROW_KEY])]])[0].astype(int)  # the encoder's, of this row
    assert np.abs(recon - tile[:, THUMB:]).mean() < 5
    assert f"{record['dataset']} {record['split']} #{record['index']}" in text and record["label_name"] in text


def test_clicking_a_point_lists_the_neighbours_jobs_neighbours_finds(page, latents, lone_point):
    click(page, lone_point)
    WebDriverWait(page, WAIT_SECONDS).until(lambda driver: len(points_data(driver, "neighbours")) == NEIGHBOURS + 1)
    shown = points_data(page, "neighbours")
    record = latents.iloc[lone_point]
    expected = neighbour_table(latents, record["dataset"], record["split"], record["index"], NEIGHBOURS)
    assert list(zip(shown["dataset"], shown["split"], shown["index"])) == list(
        zip(expected["dataset"], expected["split"], expected["index"])
    )
    assert np.allclose(shown["distance"], expected["distance"], atol=1e-5)
    # The table shows each listed row's own tile: where tile_positions put that row on its sheet.
    rows = [
        latents.index[(latents["dataset"] == d) & (latents["split"] == s) & (latents["index"] == i)][0]
        for d, s, i in zip(shown["dataset"], shown["split"], shown["index"])
    ]
    tiles = tile_positions(len(latents))
    offsets = [tile_offset(page, element) for element in find(page, "medvq-neighbour")]
    assert offsets == [(tiles["tx"][row], tiles["ty"][row]) for row in rows]


def test_where_points_crowd_a_click_lists_the_point_the_tooltip_shows(page):
    crowd = crowding(point_positions(page), POINT_SIZE / 2 - 0.5)  # hit wherever the pointer rounds to a pixel
    row = int(crowd.argmax())
    assert crowd[row] >= 2  # more than one point under the pointer
    click(page, row)
    heading = read_hover(page, hover_text, WAIT_SECONDS).splitlines()[0]
    first = points_data(page, "neighbours").iloc[0]
    assert heading == f"{first['dataset']} {first['split']} #{first['index']}"


def test_a_split_the_legend_hides_can_be_neither_hovered_nor_clicked(page, latents):
    hide = 'Bokeh.documents[0].get_model_by_name("legend").items[0].renderers[0].visible = arguments[0]'
    page.execute_script(hide, False)  # what a click on the legend's first item does
    hidden = latents.query("dataset == 'breastmnist' and split == 'train'")
    assert page.execute_script(POINTABLE) == len(latents) - len(hidden)
    page.execute_script(hide, True)
    assert page.execute_script(POINTABLE) == len(latents)
