"""Storage stage: LocalStorage, and S3Storage against a real S3-compatible server (moto in server
mode on 127.0.0.1, started here). Transient faults are injected at the HTTP layer through botocore's
``before-send`` event, so botocore's retry handler and ours both see genuine 503 responses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.storage import LocalStorage, open_storage

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")  # the `endpoint` fixture (conftest.py) runs a moto server

from botocore.awsrequest import AWSResponse  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from runner.storage_s3 import S3Options, S3Storage, S3StorageError, parse_s3_uri  # noqa: E402

ACCESS_KEY = "AKIATESTTESTTESTTEST"
SECRET_KEY = "s3cr3t-never-printed-0123456789abcdef"


def _client(endpoint: str, max_attempts: int = 0) -> Any:
    """``max_attempts`` counts botocore *retries* (the first try excluded): 0 = none."""
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            retries={"mode": "standard", "max_attempts": max_attempts}, s3={"addressing_style": "path"}
        ),
    )


@pytest.fixture()
def bucket(endpoint: str) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    _client(endpoint).create_bucket(Bucket=name)
    return name


def _store(
    endpoint: str, root: str, max_attempts: int = 0, sleeps: list[float] | None = None, **opts: Any
) -> S3Storage:
    sink = sleeps if sleeps is not None else []
    return S3Storage(
        root,
        client=_client(endpoint, max_attempts),
        options=S3Options(backoff_base_s=0.01, **opts),
        sleep=sink.append,
    )


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def _inject_503(client: Any, operation: str, failures: int) -> list[int]:
    """Answer the next ``failures`` HTTP sends of ``operation`` with a 503 SlowDown."""
    seen = [0]

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        if seen[0] < failures:
            seen[0] += 1
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    client.meta.events.register(f"before-send.s3.{operation}", hook)
    return seen


# -- LocalStorage -----------------------------------------------------------------------------------


def test_local_storage_roundtrip_listing_and_escape(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    st.write_bytes("b/x.PDF", b"1")
    st.write_bytes("a.pdf", b"2")
    st.write_bytes("a.md", b"3")
    assert st.list_files() == ["a.pdf", "b/x.PDF"]
    assert st.read_bytes("b/x.PDF") == b"1"
    assert st.exists("a.md") and not st.exists("zzz.md")
    st.delete("a.md")
    assert not st.exists("a.md")
    with pytest.raises(ValueError):
        st.write_bytes("../outside.md", b"x")
    assert not (tmp_path.parent / "outside.md").exists()


# -- S3Storage --------------------------------------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bkt/a/b/") == ("bkt", "a/b")
    assert parse_s3_uri("s3://bkt") == ("bkt", "")
    with pytest.raises(ValueError):
        parse_s3_uri("/local/path")
    with pytest.raises(ValueError):
        parse_s3_uri("s3:///nobucket")


def test_s3_roundtrip_exists_delete(endpoint: str, bucket: str) -> None:
    st = _store(endpoint, f"s3://{bucket}/out/run1")
    assert not st.exists("doc.md")
    st.write_bytes("sub/doc.md", "# Titre é\n".encode())
    assert st.exists("sub/doc.md")
    assert st.read_bytes("sub/doc.md") == "# Titre é\n".encode()
    head = _client(endpoint).head_object(Bucket=bucket, Key="out/run1/sub/doc.md")
    assert head["ContentLength"] == len("# Titre é\n".encode())
    st.delete("sub/doc.md")
    assert not st.exists("sub/doc.md")
    st.delete("sub/doc.md")  # deleting a missing object is fine


def test_s3_listing_is_recursive_sorted_paginated_and_prefix_bounded(endpoint: str, bucket: str) -> None:
    c = _client(endpoint)
    keys = [f"in/d{i % 3}/f{i:02d}.pdf" for i in range(11)] + ["in/UPPER.PDF", "in/notes.txt", "in/dir/"]
    keys += ["in2/sibling.pdf", "other/x.pdf"]
    for k in reversed(keys):
        c.put_object(Bucket=bucket, Key=k, Body=b"%PDF-")
    st = _store(endpoint, f"s3://{bucket}/in", list_page_size=4)
    expected = sorted(k[len("in/") :] for k in keys if k.startswith("in/") and k.lower().endswith(".pdf"))
    assert st.list_files() == expected
    assert st.list_files((".txt",)) == ["notes.txt"]
    size, etag = st.stat("UPPER.PDF")
    assert size == 5 and etag.strip('"')
    fresh = _store(endpoint, f"s3://{bucket}/in")  # no listing yet: stat lists once, then answers
    assert fresh.stat("UPPER.PDF") == (size, etag) and fresh.stat("notes.txt")[0] == 5
    whole_bucket = _store(endpoint, f"s3://{bucket}")
    assert "in2/sibling.pdf" in whole_bucket.list_files() and "other/x.pdf" in whole_bucket.list_files()


def test_s3_local_path_downloads_then_removes(endpoint: str, bucket: str) -> None:
    st = _store(endpoint, f"s3://{bucket}/in")
    st.write_bytes("a/b.pdf", b"%PDF-1.7 body")
    with st.local_path("a/b.pdf") as p:
        assert Path(p).read_bytes() == b"%PDF-1.7 body"
        assert p.endswith(".pdf")
    assert not os.path.exists(p)


def test_s3_multipart_upload_above_threshold(endpoint: str, bucket: str) -> None:
    mib = 1024 * 1024
    st = _store(endpoint, f"s3://{bucket}/big", multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    data = os.urandom(11 * mib + 123)
    st.write_bytes("x.bin", data)
    etag = _client(endpoint).head_object(Bucket=bucket, Key="big/x.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert st.read_bytes("x.bin") == data
    st.write_bytes("small.md", b"tiny")
    assert "-" not in _client(endpoint).head_object(Bucket=bucket, Key="big/small.md")["ETag"]


def test_s3_transient_errors_are_retried_with_backoff(endpoint: str, bucket: str) -> None:
    sleeps: list[float] = []
    st = _store(endpoint, f"s3://{bucket}/o", max_attempts=0, sleeps=sleeps, transfer_attempts=4)
    seen = _inject_503(st.client, "PutObject", failures=2)
    st.write_bytes("r.md", b"after two 503s")
    assert seen[0] == 2
    assert len(sleeps) == 2 and sleeps[1] > 0 and all(s <= 20 for s in sleeps)
    assert _client(endpoint).get_object(Bucket=bucket, Key="o/r.md")["Body"].read() == b"after two 503s"


def test_s3_botocore_retry_mode_absorbs_a_503_without_our_retry(endpoint: str, bucket: str) -> None:
    sleeps: list[float] = []
    st = _store(endpoint, f"s3://{bucket}/o", max_attempts=2, sleeps=sleeps)
    seen = _inject_503(st.client, "GetObject", failures=1)
    st.write_bytes("g.md", b"data")
    assert st.read_bytes("g.md") == b"data"
    assert seen[0] == 1 and sleeps == []  # botocore retried inside one call


def test_s3_retries_give_up_with_a_clear_error_and_no_secret(endpoint: str, bucket: str) -> None:
    sleeps: list[float] = []
    st = _store(endpoint, f"s3://{bucket}/o", max_attempts=0, sleeps=sleeps, transfer_attempts=3)
    _inject_503(st.client, "PutObject", failures=100)
    with pytest.raises(S3StorageError) as err:
        st.write_bytes("never.md", b"x")
    msg = str(err.value)
    assert f"s3://{bucket}/o/never.md" in msg and "3 attempts" in msg
    assert SECRET_KEY not in msg and ACCESS_KEY not in msg
    assert len(sleeps) == 2
    assert not st.exists("never.md")


def test_s3_permanent_errors_are_not_retried(endpoint: str) -> None:
    sleeps: list[float] = []
    st = _store(endpoint, "s3://no-such-bucket-xyz/p", sleeps=sleeps)
    with pytest.raises(ClientError):
        st.write_bytes("a.md", b"x")
    assert sleeps == []


def test_s3_paths_cannot_escape_the_prefix_and_uri_has_no_credentials(endpoint: str, bucket: str) -> None:
    st = _store(endpoint, f"s3://{bucket}/out")
    for bad in ("../x.md", "a/../../x.md", "a/../x.md", "/abs.md", "", "nul\x00.md"):
        with pytest.raises(ValueError):
            st.write_bytes(bad, b"x")
    assert st.uri("a/b.md") == f"s3://{bucket}/out/a/b.md"
    assert SECRET_KEY not in repr(st.__dict__.get("root")) and "@" not in st.uri("a/b.md")


def test_s3_cleanup_partial_aborts_only_this_documents_uploads(endpoint: str, bucket: str) -> None:
    c = _client(endpoint)
    mine = c.create_multipart_upload(Bucket=bucket, Key="out/d/doc.md")["UploadId"]
    c.create_multipart_upload(Bucket=bucket, Key="out/d/doc2.md")
    st = _store(endpoint, f"s3://{bucket}/out")
    assert st.cleanup_partial("d/doc", (".md", ".pages.jsonl", ".done")) == 1
    left = {u["Key"]: u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert "out/d/doc.md" not in left and mine not in left.values()
    assert "out/d/doc2.md" in left


def test_open_storage_uses_the_endpoint_from_the_environment(
    endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    st = open_storage(f"s3://{bucket}/env")
    assert isinstance(st, S3Storage)
    st.write_bytes("e.md", b"via env")
    assert _client(endpoint).get_object(Bucket=bucket, Key="env/e.md")["Body"].read() == b"via env"


def test_s3_odd_but_legal_keys_are_read_back_verbatim(endpoint: str, bucket: str) -> None:
    c = _client(endpoint)
    odd = ["in/we ird\\name é.pdf", "in/dbl//slash.pdf", "in/./dot.pdf"]
    for i, k in enumerate(odd):
        c.put_object(Bucket=bucket, Key=k, Body=f"%PDF-{i}".encode())
    st = _store(endpoint, f"s3://{bucket}/in")
    rels = st.list_files()
    assert rels == sorted(k[len("in/") :] for k in odd)
    for rel in rels:
        key = f"in/{rel}"
        with st.local_path(rel) as p:
            assert Path(p).read_bytes() == f"%PDF-{odd.index(key)}".encode()
