"""What the jobs share: where outputs go (a folder or a URI) and where Ray's storage goes by default."""

from __future__ import annotations

import pytest

from medvq.cli import default_storage, output_folder


def test_a_folder_is_written_in_place(tmp_path):
    with output_folder(str(tmp_path / "out")) as out:
        assert out == tmp_path / "out"


def test_a_uri_gets_a_local_folder_uploaded_after_success(tmp_path):
    target = tmp_path / "remote"
    with output_folder(f"file://{target}") as out:
        (out / "plots").mkdir()
        (out / "plots" / "a.png").write_bytes(b"png")
        assert not (target / "plots").exists()  # nothing lands before the job has succeeded
    assert (target / "plots" / "a.png").read_bytes() == b"png"
    assert not out.exists()  # the temporary folder is gone


def test_a_failed_job_uploads_nothing(tmp_path):
    target = tmp_path / "remote"
    with pytest.raises(RuntimeError), output_folder(f"file://{target}") as out:
        (out / "half-written.csv").write_text("1,2")
        raise RuntimeError("the job failed")
    assert not (target / "half-written.csv").exists()


def test_storage_defaults_to_ray_results_under_out(tmp_path):
    assert default_storage("s3://bucket/run/") == "s3://bucket/run/ray_results"
    assert default_storage(str(tmp_path / "out")) == str(tmp_path / "out" / "ray_results")
