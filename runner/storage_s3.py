"""Storage stage, S3 flavour: input PDFs from and outputs to ``s3://bucket/prefix`` via boto3.

Same interface as ``runner.storage.LocalStorage``; relative paths use ``/`` and map to keys under
the prefix. Writes go through boto3's managed transfer: a single PUT below the multipart threshold,
a multipart upload above it; either way the object appears atomically when the upload completes, so
no temporary keys are needed and a reader never sees half an object. Transient faults are retried
twice over: botocore's own retry mode on every HTTP call, and ``_with_retry`` around each whole
transfer (a multipart upload that fails part-way is retried from the start, not left half-done).

Credentials come from boto3's usual chain (instance role, environment, profile) and never appear in
anything this module prints: ``uri()`` is ``s3://bucket/key`` and error messages name keys only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import posixpath
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes worth another try: throttling, server-side faults, timeouts.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "500",
        "502",
        "503",
        "504",
    }
)
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3StorageError(RuntimeError):
    """An S3 operation failed for good; the message names the URI (never credentials)."""


@dataclass(frozen=True)
class S3Options:
    """Transfer and retry knobs. Defaults suit GPU workers writing small Markdown/JSONL files."""

    endpoint_url: str | None = None  # None = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS default
    region: str | None = None
    botocore_retry_mode: str = "adaptive"  # "standard" | "adaptive" (client-side rate limiting)
    botocore_max_attempts: int = 8  # botocore counts retries here, the first try excluded
    transfer_attempts: int = 4  # our retries around a whole managed transfer
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 8
    list_page_size: int = 1000  # keys per LIST request (S3's maximum)

    def __post_init__(self) -> None:
        if self.botocore_retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError("botocore_retry_mode must be standard, adaptive or legacy")
        if self.botocore_max_attempts < 0 or self.transfer_attempts < 1:
            raise ValueError("attempt counts must be >= 1")
        if self.multipart_chunksize < 5 * 1024 * 1024:
            raise ValueError("multipart_chunksize must be >= 5 MiB (S3's minimum part size)")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``. The prefix has no leading/trailing slash."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may cure (throttling, 5xx, dropped connections, timeouts)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(err.get("Code")) in TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    try:
        from boto3.exceptions import S3UploadFailedError
    except ImportError:  # pragma: no cover - boto3 always ships it
        return False
    if isinstance(exc, S3UploadFailedError):
        text = str(exc)
        return any(code in text for code in TRANSIENT_CODES)
    return False


def _error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code"))
    return None


def make_client(options: S3Options) -> Any:
    """A boto3 S3 client with botocore's retry mode configured. boto3 is imported here, lazily."""
    import boto3
    from botocore.config import Config

    endpoint = (
        options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    config = Config(
        retries={"mode": options.botocore_retry_mode, "max_attempts": options.botocore_max_attempts},
        max_pool_connections=max(10, options.max_concurrency * 2),
        # Path-style addressing works with every S3-compatible server (MinIO, moto, Ceph).
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=options.region, config=config
    )


class S3Storage:
    """``Storage`` over ``s3://bucket/prefix``. Pass ``client`` to share or inject a boto3 client."""

    def __init__(
        self,
        root: str,
        client: Any = None,
        options: S3Options | None = None,
        endpoint_url: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = root
        self.bucket, self.prefix = parse_s3_uri(root)
        self.options = options or S3Options(endpoint_url=endpoint_url)
        if endpoint_url and not self.options.endpoint_url:
            self.options = dataclasses.replace(self.options, endpoint_url=endpoint_url)
        self._client = client
        self._sleep = sleep
        # Size and ETag of every listed object, so ``stat`` after ``list_files`` costs no request.
        self._listed: dict[str, tuple[int, str]] = {}

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.options)
        return self._client

    def _key(self, rel: str) -> str:
        # Keys are used verbatim (S3 does not normalise "a//b" or "a/./b", and an input listed
        # under such a key must be read back under the same one); only a leading "/" and ".."
        # segments are refused, so nothing can address a key outside the prefix.
        if not rel or rel.startswith("/") or "\x00" in rel:
            raise ValueError(f"path {rel!r} is not a relative storage path")
        if ".." in rel.split("/"):
            raise ValueError(f"path {rel!r} escapes the storage root")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        o = self.options
        return TransferConfig(
            multipart_threshold=o.multipart_threshold,
            multipart_chunksize=o.multipart_chunksize,
            max_concurrency=o.max_concurrency,
            use_threads=o.max_concurrency > 1,
        )

    def _with_retry(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on a transient error sleep (exponential backoff, full jitter) and retry."""
        attempts = self.options.transfer_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == attempts:
                    raise S3StorageError(
                        f"{what} {self.uri(rel)} failed after {attempts} attempts: {type(exc).__name__}: "
                        f"{_error_code(exc) or exc}"
                    ) from exc
                delay = min(self.options.backoff_max_s, self.options.backoff_base_s * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                log.warning(
                    "%s %s: transient %s (attempt %d/%d), retrying in %.2fs",
                    what,
                    self.uri(rel),
                    _error_code(exc) or type(exc).__name__,
                    attempt,
                    attempts,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- Storage protocol -----------------------------------------------------------------------

    def list_files(self, suffixes: tuple[str, ...] = (".pdf",)) -> list[str]:
        """All keys under the prefix ending in one of ``suffixes`` (case-insensitive), sorted."""
        lowered = tuple(s.lower() for s in suffixes)
        list_prefix = f"{self.prefix}/" if self.prefix else ""

        def scan() -> list[tuple[str, int, str]]:
            found = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(
                Bucket=self.bucket,
                Prefix=list_prefix,
                PaginationConfig={"PageSize": self.options.list_page_size},
            ):
                for obj in page.get("Contents", ()):
                    key = obj["Key"]
                    if key.endswith("/") or not key.lower().endswith(lowered):
                        continue
                    found.append((self._rel(key), int(obj.get("Size", 0)), str(obj.get("ETag", ""))))
            return found

        found = self._with_retry("list", "", scan)
        for rel, size, etag in found:
            self._listed[rel] = (size, etag)
        return sorted(rel for rel, _, _ in found)

    def stat(self, rel: str) -> tuple[int, str]:
        """``(size, etag)`` of an object: a fingerprint for caches (see ``runner.shard``)."""
        if not self._listed and rel.lower().endswith(".pdf"):
            self.list_files()  # one paginated LIST instead of a HEAD per input (page-count cache)
        if rel in self._listed:
            return self._listed[rel]
        head = self._with_retry(
            "head", rel, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        )
        return int(head.get("ContentLength", 0)), str(head.get("ETag", ""))

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        key = self._key(rel)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                code = _error_code(exc)
                if code in NOT_FOUND_CODES:
                    return False
                if code in ("403", "AccessDenied", "Forbidden"):
                    # S3 answers 403 instead of 404 for a missing key unless the caller may list the
                    # bucket; the least-privilege worker role may list only its prefix, so ask that way.
                    resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
                    return any(o.get("Key") == key for o in resp.get("Contents", ()))
                raise
            return True

        return self._with_retry("head", rel, head)

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)

        def get() -> bytes:
            buf = io.BytesIO()
            self.client.download_fileobj(self.bucket, key, buf, Config=self._transfer_config())
            return buf.getvalue()

        return self._with_retry("read", rel, get)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Upload ``data``; one PUT below the multipart threshold, a multipart upload above."""
        key = self._key(rel)
        self._with_retry(
            "write",
            rel,
            lambda: self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, key, Config=self._transfer_config()
            ),
        )
        self._listed.pop(rel, None)

    def delete(self, rel: str) -> None:
        key = self._key(rel)
        self._with_retry("delete", rel, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        self._listed.pop(rel, None)

    @contextlib.contextmanager
    def local_path(self, rel: str) -> Iterator[str]:
        """Download to a private temporary file (streamed to disk, never whole in memory); removed
        when the context exits."""
        key = self._key(rel)
        suffix = posixpath.splitext(rel)[1][:16]
        fd, tmp = tempfile.mkstemp(prefix="s3-", suffix=suffix)
        os.close(fd)
        try:
            self._with_retry(
                "download",
                rel,
                lambda: self.client.download_file(self.bucket, key, tmp, Config=self._transfer_config()),
            )
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}" if rel else f"s3://{self.bucket}/{self.prefix}"

    def cleanup_partial(self, rel_stem: str, suffixes: tuple[str, ...]) -> int:
        """S3 objects appear atomically, so there are no partial objects; this aborts multipart
        uploads an interrupted writer left for ``rel_stem`` + a suffix (they are invisible but
        billed). Returns the number aborted."""
        keys = {self._key(rel_stem + suf) for suf in suffixes}
        prefix = self._key(rel_stem)
        n = 0
        resp = self._with_retry(
            "list-uploads",
            rel_stem,
            lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix),
        )
        for up in resp.get("Uploads", ()):
            if up["Key"] in keys:
                key, upload_id = str(up["Key"]), str(up["UploadId"])

                def abort(key: str = key, upload_id: str = upload_id) -> Any:
                    return self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

                self._with_retry("abort-upload", rel_stem, abort)
                n += 1
        return n
