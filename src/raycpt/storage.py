"""Object storage: one place that turns a location (local folder or ``s3://bucket/prefix``) into a
pyarrow filesystem and does the few operations raycpt needs on it.

pyarrow's filesystems already give us one interface for local disk and S3, with the AWS SDK's
credential chain (environment, profile, web identity / IRSA) and its retry strategy, so nothing
here speaks HTTP itself. This module knows nothing of tokens or training.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed permanently; the message names the object and what to check."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs = {
        # Transient faults (5xx, throttling, resets) are retried by the AWS SDK itself.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if region:
        kwargs["region"] = region
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path within it) for a local path or an s3:// URI."""
    if is_remote(uri):
        parsed = urlparse(uri)
        fs = _s3_filesystem(
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported location {uri!r}: use a local path or s3://bucket/prefix")
    path = uri.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a location, keeping the s3:// scheme."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _describe(err: OSError, uri: str) -> StorageError:
    text = str(err)
    hint = ""
    if "AccessDenied" in text or "403" in text or "InvalidAccessKeyId" in text:
        hint = " (check the credentials: AWS_ACCESS_KEY_ID / profile / IRSA role, and the bucket policy)"
    elif "NoSuchBucket" in text:
        hint = " (the bucket does not exist: create it or fix the bucket name)"
    elif "No space left" in text:
        hint = " (the disk is full: free space or choose another location)"
    return StorageError(f"{uri}: {text}{hint}")


def read_bytes(uri: str) -> bytes:
    """Read a whole object or file."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except OSError as err:
        raise _describe(err, uri) from err


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise _describe(err, uri) from err


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise _describe(err, uri) from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object so that readers see either nothing or all of it.

    On S3 a single PUT (or a completed multipart upload) is atomic already. On local disk we
    write a temporary sibling and rename it into place.
    """
    fs, path = filesystem(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as err:
        raise _describe(err, uri) from err


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _describe(err, uri) from err


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under a location (recursively), as full locations, sorted; or the file itself."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: not found")
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as err:
        raise _describe(err, uri) from err
    out = []
    for i in infos:
        if i.type != pafs.FileType.File or (suffixes and not i.path.endswith(suffixes)):
            continue
        rel = os.path.relpath(i.path, path) if not is_remote(uri) else i.path[len(path) + 1 :]
        out.append(join(uri, rel))
    return sorted(out)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder or prefix to a local folder (used for checkpoints and base models)."""
    if not is_remote(uri):
        return filesystem(uri)[1]
    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    try:
        pafs.copy_files(
            path,
            local_dir,
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
            use_threads=True,
        )
    except OSError as err:
        raise _describe(err, uri) from err
    return local_dir
