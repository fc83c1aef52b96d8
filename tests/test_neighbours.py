"""The nearest images of one image: the search itself, and jobs/neighbours.py's table, picture and errors."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvq.neighbours import neighbour_table
from medvq.plots import DPI, NEIGHBOUR_COLUMNS, NEIGHBOUR_TILE
from medvq.probes import nearest
from tests.conftest import REPO
from tests.test_plots import encoded_run

JOB = REPO / "jobs" / "neighbours.py"


@pytest.fixture
def run(tiny_config, tmp_path) -> Path:
    return encoded_run(tmp_path / "run", tiny_config())


def test_an_image_is_never_its_own_neighbour_even_among_exact_copies():
    points = np.array([[0.0], [0.0], [0.0], [5.0]])  # three copies: one may come before the query itself
    found, distances = nearest(points, 1)
    assert [row not in neighbours for row, neighbours in enumerate(found)] == [True] * 4
    assert set(found.ravel()) <= {0, 1, 2} and distances.ravel().tolist() == [0, 0, 0, 5]


def test_the_job_prints_the_image_and_its_neighbours_and_draws_them(run):
    done = subprocess.run(
        [
            sys.executable,
            str(JOB),
            "--run",
            str(run),
            "--dataset",
            "retinamnist",
            "--split",
            "val",
            "--index",
            "5",
            "--k",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = neighbour_table(pd.read_parquet(run / "latents"), "retinamnist", "val", 5, 3)
    printed = done.stdout.splitlines()[2:6]  # a heading, the column names, then one line per image
    assert [line.split()[:3] for line in printed] == [
        [d, s, str(i)] for d, s, i in zip(expected["dataset"], expected["split"], expected["index"])
    ]
    assert printed[0].split()[:4] == ["retinamnist", "val", "5", str(expected["label"][0])]
    picture = run / "plots" / "neighbours_retinamnist_val_5.png"
    assert done.stdout.splitlines()[-1] == f"wrote {picture}"
    width, height = NEIGHBOUR_TILE
    with Image.open(picture) as image:  # the image and its 3 neighbours, on one row
        assert image.size == (round(min(4, NEIGHBOUR_COLUMNS) * width * DPI), round(height * DPI))
        assert "data: breastmnist, retinamnist at 28 px" in image.text["Description"]  # the run's caption


@pytest.mark.parametrize(
    "dataset, index, drop_latents, message",
    [
        (
            "bloodmnist",
            0,
            False,
            "--dataset 'bloodmnist' is not in this run's latents: choose from breastmnist, retinamnist",
        ),
        ("breastmnist", 999, False, "--index 999 is out of range"),
        ("breastmnist", 0, True, "has no latents/"),
    ],
    ids=["unknown-dataset", "index-out-of-range", "run-without-latents"],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(
    run, dataset, index, drop_latents, message, monkeypatch, capsys
):
    if drop_latents:
        shutil.rmtree(run / "latents")
    monkeypatch.setattr(
        sys, "argv", [str(JOB), "--run", str(run), "--dataset", dataset, "--split", "test", "--index", str(index)]
    )
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(JOB), run_name="__main__")
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith("error: ") and message in error
    assert not (run / "plots").exists()
