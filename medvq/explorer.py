"""explorer.html: every image of a run at its UMAP position, on one self-contained page (no server, no network).

Bokeh, because its hover tool fills an HTML template per point (here: the image beside its reconstruction), its
tap tool selects points, and it writes a standalone page with every script inlined.

Thumbnails are sprite sheets: WebP images of up to SHEET_COLUMNS x SHEET_ROWS tiles, each tile an image beside
its reconstruction. Each sheet is set once, as a CSS variable on the page's root (variables reach into the
shadow DOM where Bokeh draws its tooltips and table cells); a point names its sheet and its tile's offset.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import (
    CategoricalColorMapper,
    CDSView,
    ColorBar,
    ColumnDataSource,
    CustomJS,
    CustomJSHover,
    DataTable,
    Div,
    FixedTicker,
    GlobalInlineStyleSheet,
    GroupFilter,
    HoverTool,
    HTMLTemplateFormatter,
    Legend,
    LegendItem,
    LinearColorMapper,
    NumberFormatter,
    RadioButtonGroup,
    TableColumn,
    TapTool,
    UnionFilter,
)
from bokeh.palettes import Category10, Category20, Viridis256
from bokeh.plotting import figure
from bokeh.resources import INLINE
from PIL import Image

from medvq.batches import to_float_images
from medvq.data import SPLITS, load_split, rgb, short_label
from medvq.encode import RECONSTRUCTION, THUMB, thumbnail_images, thumbnail_pixels
from medvq.errors import UserError
from medvq.latent_space import NEIGHBOURS, vectors
from medvq.probes import nearest
from medvq.report import ROW_KEY
from medvq.storage import write_atomically

# Tiles per sheet: a sheet's data URI must stay under Chrome's 2 MiB limit on one CSS variable.
SHEET_COLUMNS, SHEET_ROWS = 32, 32
WEBP_QUALITY = 70  # lossy: a thumbnail needs no exact pixels, and lossless sheets would be several times larger
WEBP_EFFORT = 2  # of 0-6: half the default's (4) time for a few % more bytes (benchmarks/RESULTS.md)
BATCH = 1024  # images shrunk at once: 1024 at 224 px take 0.6 GB as floats
HOVER_ZOOM, TABLE_ZOOM = 3, 2  # thumbnails shown at 84 px in the tooltip, 56 px in the neighbour table
MAP_SIZE = (760, 700)  # px of the map itself, without its legend and colour bars
POINT_SIZE = 5  # px; also how near the pointer must come for a point to be hovered
TABLE_WIDTH = 470
# The Parquet columns the page keeps as they are for each point, beside its class, sheet and tile offset.
POINT_COLUMNS = ["dataset", "split", "psnr", "ssim", "umap_x", "umap_y"]

# Fills the neighbour table (and its rings on the map) with the selected point and its nearest images.
SHOW_NEIGHBOURS = """
const i = source.selected.indices[0]
const rows = i === undefined ? [] : [i, ...neighbours.slice(i * k, (i + 1) * k)]
const data = {distance: i === undefined ? [] : [0, ...distances.slice(i * k, (i + 1) * k)]}
for (const name of Object.keys(source.data)) data[name] = rows.map(j => source.data[name][j])
data.label_name = data.class_id.map(id => label_names[id])
target.data = data
"""
# Points the pointer can hover or tap: those of the splits the legend shows.
FOLLOW_LEGEND = """
const visible = groups.filter(group => group.visible)
pointer.visible = visible.length > 0
if (visible.length > 0) shown.operands = visible.map(group => group.view.filter)
"""
# Colours every point by the chosen field, and shows that field's colour bar.
RECOLOUR = """
const mode = modes[cb_obj.active]
for (const r of renderers) r.glyph.fill_color = {field: mode.field, transform: mode.mapper}
for (const other of modes) if (other.bar) other.bar.visible = other === mode
"""


def draw_explorer(
    latents: pd.DataFrame,
    reconstructions: pa.Table,
    data_root: str | Path,
    size: int,
    path: Path,
    caption: str = "",
):
    """Write the page for every row of `latents` (the encoder's columns, with UMAP), its thumbnails drawn from
    the images of side `size` in `data_root` and the encoder's thumbnails of their reconstructions (the table of
    report.RECONSTRUCTIONS_FILE); `caption` (where the run comes from) at its foot."""
    latents = latents.reset_index(drop=True)
    sheets = _sheets(_tiles(latents, reconstructions, data_root, size))
    neighbours = vectors(latents["neighbours"]) if "neighbours" in latents else None  # found before the UMAP
    if neighbours is not None and neighbours.max() < len(latents):  # row numbers of latents.parquet, read in order
        distances = vectors(latents["neighbour_distances"])
    elif "features" in latents:  # latents written before they were kept, or a part of them
        neighbours, distances = nearest(vectors(latents["features"]), min(NEIGHBOURS, len(latents) - 1))
    else:
        raise UserError("the latents' neighbours are not their own rows' and their features were not read")
    page = _page(latents, neighbours, distances, caption)
    page.stylesheets = [_sheet_variables(sheets)]
    write_atomically(path, file_html(page, INLINE, title="medvq latent explorer").encode())


def _tiles(latents: pd.DataFrame, reconstructions: pa.Table, data_root: str | Path, size: int) -> np.ndarray:
    """Every row's image beside its reconstruction, in the rows' order: (N, THUMB, 2 THUMB, 3) uint8."""
    keys = reconstructions.select(ROW_KEY).to_pandas().assign(_row=np.arange(reconstructions.num_rows))
    found = latents[ROW_KEY].merge(keys, on=ROW_KEY, how="left")["_row"]
    if found.isna().any():
        raise UserError(f"{found.isna().sum()} images have no reconstruction beside the latents: encode them again")
    shown = thumbnail_images(reconstructions.column(RECONSTRUCTION))[found.to_numpy(int)]
    originals, index = np.zeros_like(shown), latents["index"].to_numpy()
    for (name, split), rows in latents.groupby(["dataset", "split"]).indices.items():
        images = rgb(load_split(name, split, data_root, size)[0])
        for start in range(0, len(rows), BATCH):
            part = rows[start : start + BATCH]
            chosen = images[index[part]]
            originals[part] = chosen if size == THUMB else thumbnail_pixels(to_float_images(torch.from_numpy(chosen)))
    return np.concatenate([originals, shown], axis=2)


def _sheets(tiles: np.ndarray) -> list[bytes]:
    """The tiles as WebP sprite sheets, SHEET_COLUMNS wide, row-major; the last sheet only as tall as it needs.
    Encoded on every core: Pillow lets go of Python's lock while it encodes."""
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(_sheet, (tiles[start : start + per_sheet] for start in range(0, len(tiles), per_sheet))))


def _sheet(block: np.ndarray) -> bytes:
    """Up to SHEET_COLUMNS x SHEET_ROWS tiles (N, height, width, 3) as one WebP image, row-major."""
    rows, height, width = -(-len(block) // SHEET_COLUMNS), block.shape[1], block.shape[2]
    grid = np.zeros((rows * SHEET_COLUMNS, height, width, 3), np.uint8)
    grid[: len(block)] = block
    grid = grid.reshape(rows, SHEET_COLUMNS, height, width, 3).transpose(0, 2, 1, 3, 4)
    buffer = io.BytesIO()
    sheet = Image.fromarray(grid.reshape(rows * height, SHEET_COLUMNS * width, 3))
    sheet.save(buffer, "WEBP", quality=WEBP_QUALITY, method=WEBP_EFFORT)
    return buffer.getvalue()


def tile_positions(count: int) -> dict[str, np.ndarray]:
    """Where row t's tile is: its sheet, and its offset in px (x, y) in that sheet."""
    t = np.arange(count)
    within = t % (SHEET_COLUMNS * SHEET_ROWS)
    return {
        "sheet": (t // (SHEET_COLUMNS * SHEET_ROWS)).astype(np.uint16),
        "tx": (within % SHEET_COLUMNS * 2 * THUMB).astype(np.uint16),
        "ty": (within // SHEET_COLUMNS * THUMB).astype(np.uint16),
    }


def _sheet_variables(sheets: list[bytes]) -> GlobalInlineStyleSheet:
    variables = "".join(
        f"--medvq-sheet-{i}:url(data:image/webp;base64,{base64.b64encode(sheet).decode()});"
        for i, sheet in enumerate(sheets)
    )
    return GlobalInlineStyleSheet(css=f":root{{{variables}}}")


def _thumb(css_class: str, zoom: int, tiles_wide: int, field: Callable[[str], str]) -> str:
    """A point's tile as a <div> (tiles_wide 2: the image and its reconstruction; 1: the image alone); `field`
    writes a column's placeholder in the template language at hand."""
    return (
        f'<div class="{css_class}" style="zoom:{zoom};width:{tiles_wide * THUMB}px;height:{THUMB}px;'
        f"image-rendering:pixelated;background:var(--medvq-sheet-{field('sheet')}) "
        f'-{field("tx")}px -{field("ty")}px"></div>'
    )


def _palette(n: int) -> list[str]:
    """The colours of latent_space.png (matplotlib's tab10 and tab20 are Bokeh's Category10 and Category20)."""
    return list((Category10[10] if n <= 10 else Category20[20])[:n])


def _classes(latents: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, label) of the run, numbered by `class_id` in that order."""
    classes = latents.drop_duplicates(["dataset", "label"]).sort_values(["dataset", "label"])
    return classes[["dataset", "label", "label_name"]].reset_index(drop=True).rename_axis("class_id").reset_index()


def _points(latents: pd.DataFrame, classes: pd.DataFrame) -> ColumnDataSource:
    """The page's columns of every point: a class is its number in `classes` (names once, not per point)."""
    class_id = latents.merge(classes, on=["dataset", "label"], how="left")["class_id"]
    columns = {name: latents[name].to_numpy() for name in POINT_COLUMNS}
    columns.update(
        index=latents["index"].to_numpy(np.int32), class_id=class_id.to_numpy(np.uint16), **tile_positions(len(latents))
    )
    return ColumnDataSource(columns, name="points")


def _colour_modes(source: ColumnDataSource, classes: pd.DataFrame) -> list[dict]:
    """What the points can be coloured by: dataset (the legend says which), class and PSNR (with colour bars)."""
    datasets = sorted(set(source.data["dataset"]))
    class_colours = [colour for _, group in classes.groupby("dataset", sort=True) for colour in _palette(len(group))]
    # One colour per class number: a linear mapper over [-0.5, n - 0.5] puts class i in the palette's bin i.
    class_bar = ColorBar(
        color_mapper=LinearColorMapper(palette=class_colours, low=-0.5, high=len(classes) - 0.5),
        ticker=FixedTicker(ticks=list(range(len(classes)))),
        title="class",
        visible=False,
        major_label_overrides={
            row.class_id: f"{row.dataset}: {short_label(row.label_name)}" for row in classes.itertuples()
        },
    )
    low, high = np.percentile(source.data["psnr"], [1, 99])
    psnr_bar = ColorBar(
        color_mapper=LinearColorMapper(palette=Viridis256, low=low, high=high), title="PSNR (dB)", visible=False
    )
    return [
        {
            "label": "dataset",
            "field": "dataset",
            "bar": None,
            "mapper": CategoricalColorMapper(factors=datasets, palette=_palette(len(datasets))),
        },
        {"label": "class", "field": "class_id", "bar": class_bar, "mapper": class_bar.color_mapper},
        {"label": "PSNR", "field": "psnr", "bar": psnr_bar, "mapper": psnr_bar.color_mapper},
    ]


def _map(source: ColumnDataSource, modes: list[dict], label_names: list[str]):
    """The map: one renderer per dataset and split, which the legend hides or shows, and the pointer's own."""
    width, height = MAP_SIZE
    # match_aspect: a unit of UMAP is as long across as up, so what looks near is near.
    plot = figure(
        frame_width=width,
        frame_height=height,
        tools="pan,wheel_zoom,box_zoom,reset",
        match_aspect=True,
        active_scroll="wheel_zoom",
        name="map",
        toolbar_location="above",
    )
    plot.axis.visible = plot.grid.visible = False  # UMAP's axes have no units worth reading
    keys = pd.DataFrame({"dataset": source.data["dataset"], "split": source.data["split"]})
    groups, items = [], []
    for (dataset, split), members in sorted(
        keys.groupby(["dataset", "split"]).indices.items(), key=lambda group: (group[0][0], SPLITS.index(group[0][1]))
    ):
        only = GroupFilter(column_name="dataset", group=dataset) & GroupFilter(column_name="split", group=split)
        groups.append(
            plot.scatter(
                "umap_x",
                "umap_y",
                source=source,
                view=CDSView(filter=only),
                size=POINT_SIZE,
                line_color=None,
                fill_alpha=0.7,
                nonselection_fill_alpha=0.2,
                fill_color={"field": "dataset", "transform": modes[0]["mapper"]},
            )
        )
        items.append(
            LegendItem(label=f"{dataset} {split} ({len(members):,})", renderers=[groups[-1]], index=int(members[0]))
        )
    plot.add_layout(Legend(items=items, click_policy="hide", title="click to hide or show", name="legend"), "right")
    for mode in modes[1:]:
        plot.add_layout(mode["bar"], "right")
    _add_pointer(plot, source, groups, label_names)
    return plot, groups


def _add_pointer(plot, source: ColumnDataSource, groups: list, label_names: list[str]) -> None:
    """Hover and tap on one unseen renderer of the points the legend shows: one hit test for both, so the point a
    click lists is the point the tooltip showed, and one tooltip even where splits overlap."""
    shown = UnionFilter(operands=[group.view.filter for group in groups])
    pointer = plot.scatter(
        "umap_x",
        "umap_y",
        source=source,
        view=CDSView(filter=shown),
        size=POINT_SIZE,
        alpha=0,
        selection_alpha=0,
        nonselection_alpha=0,
        name="pointer",
    )
    follow = CustomJS(args={"groups": groups, "shown": shown, "pointer": pointer}, code=FOLLOW_LEGEND)
    for group in groups:
        group.js_on_change("visible", follow)
    tooltip = (
        _thumb("medvq-hover", HOVER_ZOOM, 2, lambda name: f"@{{{name}}}")
        + "<div><b>@dataset</b> @split #@index</div><div>@class_id{custom}</div>"
        + "<div>PSNR @psnr{0.00} dB, SSIM @ssim{0.000}</div>"
    )
    label_name = CustomJSHover(args={"names": label_names}, code="return names[value]")
    plot.add_tools(
        HoverTool(renderers=[pointer], tooltips=tooltip, formatters={"@class_id": label_name}, limit=1),
        TapTool(renderers=[pointer]),
    )


def _page(latents: pd.DataFrame, neighbours: np.ndarray, distances: np.ndarray, caption: str):
    """The neighbour table, then the map (legend, hover, colour bars last, so showing one moves nothing else)."""
    classes = _classes(latents)
    source = _points(latents, classes)
    modes = _colour_modes(source, classes)
    plot, renderers = _map(source, modes, list(classes["label_name"]))
    listed = ColumnDataSource({name: [] for name in (*source.data, "label_name", "distance")}, name="neighbours")
    plot.scatter("umap_x", "umap_y", source=listed, size=3 * POINT_SIZE, fill_alpha=0, line_color="black", line_width=2)
    k = neighbours.shape[1]
    source.selected.js_on_change(
        "indices",
        CustomJS(
            args={
                "source": source,
                "target": listed,
                "neighbours": neighbours.ravel().astype(np.int32),
                "distances": distances.ravel().astype(np.float32),
                "k": k,
                "label_names": list(classes["label_name"].map(short_label)),
            },
            code=SHOW_NEIGHBOURS,
        ),
    )
    colour = RadioButtonGroup(labels=[mode["label"] for mode in modes], active=0, name="colour")
    colour.js_on_change("active", CustomJS(args={"modes": modes, "renderers": renderers}, code=RECOLOUR))
    heading = Div(
        text=f"<b>{len(latents):,} images</b> of {', '.join(sorted(set(source.data['dataset'])))}, each "
        f"at the UMAP position of its features (the encoder's, pooled). Hover a point: the image beside its "
        f"reconstruction. Click one: its {k} nearest images by those features, listed on the left. Colour by:"
    )
    table_heading = Div(
        text="<b>The clicked image and its nearest images</b> (Euclidean distance of their features, over all "
        "datasets)",
        width=TABLE_WIDTH,
    )
    foot = Div(text=html.escape(caption), name="caption", styles={"color": "dimgrey", "font-size": "small"})
    return column(row(heading, colour), row(column(table_heading, _neighbour_table(listed, k)), plot), foot)


def _neighbour_table(listed: ColumnDataSource, k: int) -> DataTable:
    image = HTMLTemplateFormatter(template=_thumb("medvq-neighbour", TABLE_ZOOM, 1, lambda name: f"<%= {name} %>"))
    columns = [
        TableColumn(field="index", title="image", formatter=image, width=TABLE_ZOOM * THUMB + 8),
        TableColumn(field="dataset", title="dataset", width=105),
        TableColumn(field="split", title="split", width=40),
        TableColumn(field="index", title="index", width=45),
        TableColumn(field="label_name", title="label"),
        TableColumn(field="distance", title="distance", formatter=NumberFormatter(format="0.000"), width=60),
    ]
    row_height = TABLE_ZOOM * THUMB + 4
    return DataTable(
        source=listed,
        columns=columns,
        row_height=row_height,
        height=(k + 2) * row_height,
        width=TABLE_WIDTH,
        index_position=None,
        reorderable=False,
        sortable=False,
    )
