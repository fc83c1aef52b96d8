"""Where medvq reads and writes: a local folder, or any URI pyarrow's filesystems take (s3://, gs://, ...).

Endpoints and credentials come from the environment as every AWS SDK reads them (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...); pyarrow reads them itself, so medvq has no flags of its own for them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from medvq.errors import UserError

PARTIAL = ".partial"  # the end of a file's name while it is written beside the one it replaces
ERROR_FILE = "error.txt"  # why a job that wrote to a folder failed or was stopped, with its traceback


def is_uri(location: str | Path | None) -> bool:
    return location is not None and "://" in str(location)


def absolute(location: str) -> str:
    """A local path made absolute (as every table and JSON records it); a URI as it is."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI; a URI pyarrow cannot open is the user's to fix."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(str(location))
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as error:  # pyarrow raises ArrowInvalid, or a filesystem's own error type
        raise UserError(f"cannot open {location}: {error}".splitlines()[0]) from None


def uri_on(storage: str, path: str) -> str:
    """The full location of `path`, a path on `storage`'s filesystem as Ray reports it (no scheme):
    under s3://bucket/storage, "bucket/storage/x" -> "s3://bucket/storage/x"; local paths stay paths."""
    if not is_uri(storage) or is_uri(path):
        return path
    return f"{storage.split('://', 1)[0]}://{path}"


def info(location: str | Path) -> pafs.FileInfo:
    filesystem, path = resolve(location)
    try:
        return filesystem.get_file_info(path)
    except OSError as error:  # a bucket that does not exist, credentials refused, an endpoint down
        raise UserError(f"cannot reach {location}: {error}".splitlines()[0]) from None


def is_file(location: str | Path) -> bool:
    return info(location).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:
        raise UserError(f"cannot read {location}: {error}".splitlines()[0]) from None


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a file to a folder (created if need be) or a URI."""
    filesystem, path = resolve(location)
    try:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        raise UserError(f"cannot write {location}: {error}".splitlines()[0]) from None


def check_writable(location: str) -> None:
    """Fail before any worker starts if `location` (a folder or a URI) cannot be created and written to."""
    try:
        filesystem, path = resolve(location)
        filesystem.create_dir(path, recursive=True)
        probe = join(path, ".medvq-write-check")
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"ok")
        filesystem.delete_file(probe)
    except Exception as error:  # pyarrow raises a different type per filesystem
        raise UserError(f"storage {location} is not writable: {error}".splitlines()[0]) from None


@contextmanager
def output_folder(out: str) -> Iterator[Path]:
    """The local folder a job writes to: --out itself, or for a URI (s3://bucket/run) a temporary folder whose
    contents are uploaded there as the job ends, however it ends (a failure, Ctrl-C, SIGTERM). A job that fails or
    is stopped leaves why in OUT/error.txt, and its error names OUT, never the temporary folder; a job that
    succeeds removes an earlier start's error.txt."""
    if not is_uri(out):
        folder = Path(absolute(out))
        with noted_errors(folder, str(folder)):
            yield folder
        (folder / ERROR_FILE).unlink(missing_ok=True)
        return
    check_writable(out)
    with tempfile.TemporaryDirectory(prefix="medvq-out-") as local:
        try:
            with noted_errors(Path(local), out):
                yield Path(local)
        except BaseException:
            try:
                upload(local, out, "what the job wrote before it ended")
            except OSError as failed:  # often what failed the job: its own error is the one to tell
                print(f"could not upload what the job wrote to {out}: {str(failed).splitlines()[0]}", flush=True)
            raise
        upload(local, out, "the outputs")
        filesystem, path = resolve(join(out, ERROR_FILE))
        if filesystem.get_file_info(path).type == pafs.FileType.File:
            filesystem.delete_file(path)


@contextmanager
def noted_errors(folder: Path, out: str) -> Iterator[None]:
    """An error that leaves the block is written, with its traceback, to folder/error.txt (when the job has made the
    folder), and names `out` where it said `folder`, the local folder that stands for it."""
    try:
        yield
    except BaseException as error:
        local, named = str(folder), out.rstrip("/")
        error.args = tuple(arg.replace(local, named) if isinstance(arg, str) else arg for arg in error.args)
        if folder.is_dir():
            (folder / ERROR_FILE).write_text("".join(traceback.format_exception(error)).replace(local, named))
        raise


def upload(local: str, out: str, what: str) -> None:
    pafs.copy_files(local, out)
    print(f"uploaded {what} to {out}", flush=True)


@contextmanager
def local_folder(location: str, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """A folder to read and write files in: a local one as it is; a URI's files (but the top-level entries
    named in `skip`) downloaded to a temporary folder, and what was written there uploaded back after."""
    if not is_uri(location):
        yield Path(absolute(location))
        return
    if info(location).type != pafs.FileType.Directory:
        raise UserError(f"{location} is not a folder")
    filesystem, root = resolve(location)
    selector = pafs.FileSelector(root, recursive=True)
    with tempfile.TemporaryDirectory(prefix="medvq-run-") as local:
        for entry in filesystem.get_file_info(selector):
            relative = entry.path[len(root.rstrip("/")) + 1 :]
            if entry.type == pafs.FileType.File and relative.split("/")[0] not in skip:
                (Path(local) / relative).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(entry.path, str(Path(local) / relative), source_filesystem=filesystem)
        before = {path: path.stat().st_mtime_ns for path in Path(local).rglob("*") if path.is_file()}
        yield Path(local)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file() and before.get(path) != path.stat().st_mtime_ns:  # new, or written again
                target = join(root, str(path.relative_to(local)))
                filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(path), target, destination_filesystem=filesystem)


def cached_copy(location: str) -> Path:
    """A node-local copy of a remote file, fetched once per version of it (size and modification time) and
    moved into place only when complete, so processes reading it at once never see half a file."""
    found = info(location)
    if found.type != pafs.FileType.File:
        raise UserError(f"{location} does not exist")
    key = hashlib.sha1(f"{location} {found.size} {found.mtime_ns}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "medvq-cache" / key / location.rsplit("/", 1)[-1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        os.close(handle)
        filesystem, remote = resolve(location)
        try:
            pafs.copy_files(remote, partial, source_filesystem=filesystem)
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)
    return path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file whole or not at all: `write` fills a partial file beside it, which is then moved into place."""
    partial = path.with_name(f".{path.name}{PARTIAL}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    replace_atomically(path, lambda partial: partial.write_bytes(data))
