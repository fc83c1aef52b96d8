"""Where medvq reads and writes: local folders and URIs alike (file:// here; S3 in tests/test_multinode.py)."""

from __future__ import annotations

import pytest

from medvq import storage
from medvq.cli import default_storage
from medvq.errors import RunFailed, UserError
from medvq.storage import (
    ERROR_FILE,
    cached_copy,
    check_writable,
    local_folder,
    output_folder,
    read_bytes,
    uri_on,
)


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


@pytest.mark.parametrize("error", [RunFailed, KeyboardInterrupt])
def test_a_failed_or_stopped_job_uploads_what_it_wrote_and_why_naming_the_uri(tmp_path, error):
    target = f"file://{tmp_path}/remote"
    with pytest.raises(error) as raised, output_folder(target) as out:
        (out / "trials.csv").write_text("1,2")
        raise error(f"no trial left a model; see {out / 'trials.csv'}")
    assert (tmp_path / "remote" / "trials.csv").read_text() == "1,2"
    assert str(raised.value) == f"no trial left a model; see {target}/trials.csv"  # not the deleted local folder
    note = (tmp_path / "remote" / ERROR_FILE).read_text()
    assert note.startswith("Traceback") and note.strip().endswith(f"see {target}/trials.csv") and str(out) not in note
    assert not out.exists()


def test_an_upload_that_fails_too_does_not_hide_why_the_job_failed(tmp_path, monkeypatch, capsys):
    def unreachable(local, out):
        raise OSError("When uploading part for key 'run/trials.csv': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(storage.pafs, "copy_files", unreachable)
    with pytest.raises(RunFailed, match="every trial diverged"), output_folder(f"file://{tmp_path}/remote"):
        raise RunFailed("every trial diverged")
    assert f"could not upload what the job wrote to file://{tmp_path}/remote: When uploading" in capsys.readouterr().out


@pytest.mark.parametrize("remote", [False, True], ids=["folder", "uri"])
def test_a_job_that_succeeds_removes_an_earlier_starts_error_note(tmp_path, remote):
    out = f"file://{tmp_path}/out" if remote else str(tmp_path / "out")
    with pytest.raises(RunFailed), output_folder(out) as folder:
        folder.mkdir(parents=True, exist_ok=True)
        raise RunFailed("every trial diverged")
    assert "RunFailed: every trial diverged" in (tmp_path / "out" / ERROR_FILE).read_text()
    with output_folder(out) as folder:
        (folder / "best.json").write_text("{}")
    assert not (tmp_path / "out" / ERROR_FILE).exists() and (tmp_path / "out" / "best.json").exists()


def test_storage_defaults_to_ray_results_under_out(tmp_path):
    assert default_storage("s3://bucket/run/") == "s3://bucket/run/ray_results"
    assert default_storage(str(tmp_path / "out")) == str(tmp_path / "out" / "ray_results")


def test_a_path_ray_reports_gets_back_the_scheme_of_its_storage():
    assert (
        uri_on("s3://bucket/storage", "bucket/storage/trial/checkpoint_000001")
        == "s3://bucket/storage/trial/checkpoint_000001"
    )
    assert uri_on("file:///srv/storage", "/srv/storage/x") == "file:///srv/storage/x"
    assert uri_on("/srv/storage", "/srv/storage/x") == "/srv/storage/x"
    assert uri_on("s3://bucket/storage", "s3://bucket/storage/x") == "s3://bucket/storage/x"


def test_a_remote_run_folder_is_read_without_the_skipped_entries_and_additions_go_back(tmp_path):
    remote = tmp_path / "run"
    (remote / "ray_results" / "trial").mkdir(parents=True)
    (remote / "ray_results" / "trial" / "big.ckpt").write_bytes(b"x" * 100)
    (remote / "latents").mkdir()
    (remote / "latents" / "part.parquet").write_bytes(b"rows")
    (remote / "plots").mkdir()
    (remote / "plots" / "old.png").write_bytes(b"old")
    with local_folder(f"file://{remote}", skip=("ray_results",)) as local:
        assert (local / "latents" / "part.parquet").read_bytes() == b"rows"
        assert not (local / "ray_results").exists()
        (local / "plots" / "a.png").write_bytes(b"png")
        (local / "plots" / "old.png").write_bytes(b"redrawn")
    assert (remote / "plots" / "a.png").read_bytes() == b"png"
    assert (remote / "plots" / "old.png").read_bytes() == b"redrawn"  # a figure drawn again goes back too
    assert (remote / "ray_results" / "trial" / "big.ckpt").stat().st_size == 100  # untouched


def test_a_remote_file_is_copied_once_per_version(tmp_path):
    remote = tmp_path / "bloodmnist.npz"
    remote.write_bytes(b"first")
    first = cached_copy(f"file://{remote}")
    assert first.read_bytes() == b"first" and cached_copy(f"file://{remote}") == first
    remote.write_bytes(b"second, longer")
    second = cached_copy(f"file://{remote}")
    assert second != first and second.read_bytes() == b"second, longer"
    assert not list(second.parent.glob(".partial-*"))  # written beside, then moved into place


def test_missing_and_unwritable_locations_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cached_copy(f"file://{tmp_path}/nothing.npz")
    with pytest.raises(UserError, match="is not writable"):
        check_writable("/proc/medvq-cannot-write-here")
    with pytest.raises(UserError, match="cannot open nosuch://"):
        read_bytes("nosuch://bucket/file")
