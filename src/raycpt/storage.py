"""Object storage: one place that turns a location (local folder or ``s3://bucket/prefix``) into a
pyarrow filesystem and does the few operations raycpt needs on it.

pyarrow's filesystems already give us one interface for local disk and S3, with the AWS SDK's
credential chain (environment, profile, web identity / IRSA) and its retry strategy, so nothing
here speaks HTTP itself. This module knows nothing of tokens or training.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import posixpath
import random
import shutil
import threading
import time
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed permanently; the message names the object and what to check."""


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Apply a config's endpoint/region for this process and the Ray workers it starts (they
    inherit these variables through the job's runtime environment)."""
    changed = False
    for var, value in (("AWS_ENDPOINT_URL", endpoint_url), ("AWS_REGION", region)):
        if value and os.environ.get(var) != value:
            os.environ[var] = value
            changed = True
    if changed:
        _S3.reset()


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


class _S3:
    """boto3 for object operations: the standard credential chain (environment, profile, web
    identity / IRSA), botocore's own retries with backoff and jitter for transient faults, ETags,
    and multipart transfers. pyarrow's filesystem (above) serves Ray Train's checkpoint storage.

    Retries: botocore's "standard" mode retries each request on transient faults (connection
    errors, timeouts, 5xx, throttling) up to 10 attempts with exponential backoff and jitter
    (20-45 s in all for a connection error); errors that would fail again (AccessDenied,
    NoSuchBucket, bad credentials) are not retried. Only checkpoint uploads add a bounded layer on
    top (`upload_dir`), because botocore's retry quota can end its retries early.
    """

    _client = None
    _retries = 0  # requests retried by botocore in this process (see retry_count)
    _lock = threading.Lock()

    @classmethod
    def client(cls):
        if cls._client is None:
            import boto3
            from botocore.config import Config

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            cls._client = boto3.session.Session().client(
                "s3",
                config=Config(
                    retries={"mode": "standard", "max_attempts": 10},
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=32,
                    # S3-compatible stores (MinIO, Ceph RGW, moto) want path-style addressing.
                    s3={"addressing_style": "path" if endpoint else "auto"},
                ),
            )
            cls._client.meta.events.register("after-call.s3", cls._count_retries)
        return cls._client

    @classmethod
    def _count_retries(cls, parsed: dict, model, **_) -> None:
        """botocore event hook: every response (success or error) says how many times its
        request was retried; count them and log it, so transient faults are visible."""
        retries = parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if retries:
            with cls._lock:
                cls._retries += retries
            log.warning("S3 %s retried %d time(s) after transient faults", model.name, retries)

    @classmethod
    def reset(cls) -> None:
        """Forget the client (after the environment's endpoint or credentials changed)."""
        cls._client = None
        _s3_filesystem.cache_clear()


def retry_count() -> int:
    """S3 requests retried after transient faults in this process so far: botocore's retries
    (counted from its responses) and upload_dir's retries of whole files."""
    return _S3._retries


def _count_retry() -> None:
    with _S3._lock:
        _S3._retries += 1


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


MULTIPART_BYTES = 64 * 2**20  # objects above this go up and down in parallel parts of this size


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=8
    )


def _describe(err: Exception, uri: str) -> StorageError:
    """A permanent storage fault as a message that names the object and what to check."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        err = err.__context__  # boto3 re-raises the ClientError as text; keep its error code
    if isinstance(err, NoCredentialsError):
        return StorageError(
            f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or a web identity (IRSA) for this pod"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        hint = {
            "NoSuchBucket": "the bucket does not exist: create it or fix the bucket name",
            "NoSuchKey": "no such object",
            "404": "no such object",
            "AccessDenied": "access denied: check the bucket policy and the role's permissions",
            "403": "access denied: check the credentials and the bucket policy",
            "InvalidAccessKeyId": "the access key id is not known to the store: check the "
            "credentials (AWS_ACCESS_KEY_ID / profile / IRSA role)",
            "SignatureDoesNotMatch": "the secret key does not match the access key id: check "
            "AWS_SECRET_ACCESS_KEY",
            "ExpiredToken": "the session token has expired: refresh the credentials",
        }.get(code, err.response.get("Error", {}).get("Message", str(err)))
        return StorageError(f"{uri}: {hint} ({code})")
    text = str(err)
    if "No space left" in text:
        text += " (the disk is full: free space or choose another location)"
    return StorageError(f"{uri}: {text}")


def _is_not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in (
        "404",
        "NoSuchKey",
        "NotFound",
    )


def read_bytes(uri: str) -> bytes:
    """Read a whole object or file."""
    try:
        if is_remote(uri):
            return _read_s3(uri)
        with open(filesystem(uri)[1], "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except Exception as err:
        if _is_not_found(err):
            raise StorageError(f"{uri}: not found") from None
        raise _describe(err, uri) from err


def _read_s3(uri: str) -> bytes:
    """Whole-object read through pyarrow's C++ S3 client, which does its I/O outside the GIL
    (boto3's reads cost 15-30 % of the loader's throughput against local disk; BENCHMARKS.md).
    pyarrow retries transient faults itself; when it gives up, the same request through boto3
    either succeeds or yields the structured error code that the message is built from."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError:
        bucket, key = _split(uri)
        return _S3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def exists(uri: str) -> bool:
    """True if the file or object exists."""
    if not is_remote(uri):
        return os.path.exists(filesystem(uri)[1])
    bucket, key = _split(uri)
    try:
        _S3.client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as err:
        if _is_not_found(err):
            return False
        raise _describe(err, uri) from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object so that readers see either nothing or all of it.

    On S3 a PUT, or a completed multipart upload, is atomic already. On local disk we write a
    temporary sibling, fsync it and rename it into place.
    """
    try:
        if is_remote(uri):
            bucket, key = _split(uri)
            _S3.client().upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config())
            return
        path = filesystem(uri)[1]
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
    except Exception as err:
        raise _describe(getattr(err, "last_exception", None) or err, uri) from err


def delete(uri: str) -> None:
    """Delete a file or object; a missing one is fine."""
    try:
        if is_remote(uri):
            bucket, key = _split(uri)
            _S3.client().delete_object(Bucket=bucket, Key=key)
        elif os.path.exists(filesystem(uri)[1]):
            os.unlink(filesystem(uri)[1])
    except Exception as err:
        raise _describe(err, uri) from err


def list_objects(uri: str) -> list[tuple[str, str]]:
    """(location, etag) of every object under an s3:// prefix, sorted by key."""
    bucket, prefix = _split(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out = []
    try:
        pages = _S3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            # Keys ending in "/" are directory markers (pyarrow, consoles): not objects to copy.
            out.extend(
                (f"s3://{bucket}/{o['Key']}", o["ETag"])
                for o in page.get("Contents", [])
                if not o["Key"].endswith("/")
            )
    except Exception as err:
        raise _describe(err, uri) from err
    return sorted(out)


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files under a location (recursively), as full locations, sorted; or the file itself."""
    if is_remote(uri):
        found = [loc for loc, _ in list_objects(uri)]
        if not found and exists(uri):
            found = [uri]
        if not found:
            raise StorageError(f"{uri}: not found (no objects under this prefix)")
    else:
        path = filesystem(uri)[1]
        if os.path.isfile(path):
            found = [uri]
        elif os.path.isdir(path):
            found = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
        else:
            raise StorageError(f"{uri}: not found")
    return sorted(f for f in found if not suffixes or f.endswith(suffixes))


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a folder or prefix to a local folder (used for checkpoints and base models)."""
    if not is_remote(uri):
        return filesystem(uri)[1]
    from concurrent.futures import ThreadPoolExecutor

    prefix = uri.rstrip("/") + "/"
    objects = [loc for loc, _ in list_objects(uri)]
    if not objects:
        raise StorageError(f"{uri}: not found (no objects under this prefix)")

    def fetch(loc: str) -> None:
        dest = os.path.join(local_dir, loc[len(prefix) :])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        bucket, key = _split(loc)
        try:
            _S3.client().download_file(bucket, key, dest, Config=_transfer_config())
        except Exception as err:
            raise _describe(err, loc) from err

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, objects))
    return local_dir


def upload_dir(local_dir: str, uri: str, last: str | None = None) -> list[str]:
    """Copy a local folder's files under a folder or prefix (merging with what is there) and
    return the locations written. All or nothing: when a file cannot be written (on S3, after
    botocore's retries and `_put_with_retries`'), the files this call wrote are removed again
    and the StorageError names the file and the cause. `last` (a path relative to the folder) is
    uploaded only after every other file is: a reader that finds it knows the rest arrived.

    For checkpoints, instead of Ray Train's default copy (pyarrow ``copy_files``): that uploads to
    S3 one file at a time, in one thread (threads are off for S3 uploads, apache/arrow#32372), and
    copies bytes on local disk. Here S3 gets boto3's managed transfers, 8 files at once and each
    in parallel multipart parts; a local destination on the same file system gets hard links (no
    bytes copied). Measured in BENCHMARKS.md (checkpoint cost).
    """
    from concurrent.futures import ThreadPoolExecutor

    files = [os.path.join(r, n) for r, _, names in os.walk(local_dir) for n in names]
    final = os.path.join(local_dir, last) if last else None
    written: list[str] = []
    for batch in ([p for p in files if p != final], [final] if final in files else []):
        with ThreadPoolExecutor(max_workers=8) as pool:  # waits for every file, failed or not
            futures = [pool.submit(_put_with_retries, path, local_dir, uri) for path in batch]
        written += [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            discard(written)
            raise errors[0]
    return written


# Waits (s, +-25 %) before upload_dir tries a file again after a transient fault outlasted
# botocore's retries: about a minute in all, then the upload fails.
FILE_RETRY_WAITS = (2, 4, 8, 16, 30)


def _put_with_retries(path: str, local_dir: str, uri: str) -> str:
    """_put_file, tried again after a transient fault (connection error, 5xx, throttling).

    A second, bounded layer over botocore's own retries, for checkpoints only: botocore's retry
    quota (500 tokens per client, 10 per connection-error retry) is drained in about a second
    when a network cut meets 8 parallel uploads, after which botocore stops retrying anything
    (measured: a 2 s cut failed a 12-file upload after 1.1 s). Permanent faults fail at once."""
    for wait in FILE_RETRY_WAITS:
        try:
            return _put_file(path, local_dir, uri)
        except StorageError as err:
            if not _is_transient(err.__cause__):
                raise
            log.warning("%s; trying again in about %d s", err, wait)
            _count_retry()
            time.sleep(wait * random.uniform(0.75, 1.25))
    return _put_file(path, local_dir, uri)  # the last try: its error goes to the caller


def _is_transient(err: BaseException | None) -> bool:
    """Whether an S3 error is one that botocore's standard mode counts as transient."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(err, S3UploadFailedError):
        err = err.__context__
    if isinstance(err, (ConnectionError, HTTPClientError)):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = err.response.get("Error", {}).get("Code")
        return status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout")
    return False


def _put_file(path: str, local_dir: str, uri: str) -> str:
    """One file of upload_dir, to its place under `uri`; returns that location."""
    rel = os.path.relpath(path, local_dir)
    dest = join(uri, *rel.split(os.sep))
    try:
        if is_remote(dest):
            bucket, key = _split(dest)
            _S3.client().upload_file(path, bucket, key, Config=_transfer_config())
            return dest
        target = filesystem(dest)[1]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system, or links not allowed: copy
            try:
                shutil.copyfile(path, target)
            except BaseException:
                with contextlib.suppress(OSError):  # no half-copied file left behind
                    os.unlink(target)
                raise
        return dest
    except Exception as err:
        raise _describe(err, dest) from err


def remove_dir(uri: str) -> None:
    """Remove a folder, or every object under an s3:// prefix; a missing one is fine."""
    if is_remote(uri):
        discard([loc for loc, _ in list_objects(uri)])
    else:
        shutil.rmtree(filesystem(uri)[1], ignore_errors=True)


def discard(locations: list[str]) -> None:
    """Remove files or objects that must not stay (a partial upload), as far as the storage
    lets us; what cannot be removed is logged and left to be ignored by its reader."""
    for loc in locations:
        try:
            delete(loc)
        except StorageError as err:
            log.warning("could not remove %s: %s", loc, err)
