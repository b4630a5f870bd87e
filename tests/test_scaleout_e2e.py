"""Scale-out end to end: shards of a generated collection run with the real CLI (``--engine text``)
from and into a local S3 server (moto, started here) are compared with one unsharded local run:
identical Markdown per document, every input processed exactly once, and a rerun after a lost
document redoes only that document. The multi-GPU launcher runs with fake GPU ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")  # the `endpoint` fixture (conftest.py) runs a moto server

from pdfgen import text_pdf  # noqa: E402  (tests/ is on sys.path via conftest)

ROOT = Path(__file__).resolve().parent.parent
CREDS = {
    "AWS_ACCESS_KEY_ID": "AKIAE2EE2EE2EE2EE2EE",
    "AWS_SECRET_ACCESS_KEY": "e2e-secret-not-logged",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Nested folders, same file name in two folders, varied page counts (the balance has work to do).
COLLECTION = {
    "a/report.pdf": 6,
    "b/report.pdf": 1,
    "c/deep/notes.pdf": 2,
    "one.pdf": 1,
    "two.pdf": 3,
    "three.pdf": 1,
    "x y (final).pdf": 2,
}


def _s3(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, endpoint: str) -> tuple[Path, str]:
    """The same PDFs in a local folder and under s3://<bucket>/in."""
    local = tmp_path_factory.mktemp("collection")
    for i, (rel, pages) in enumerate(sorted(COLLECTION.items())):
        text_pdf(local / rel, pages=pages, prefix=f"Doc{i}")
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3 = _s3(endpoint)
    s3.create_bucket(Bucket=bucket)
    for rel in COLLECTION:
        s3.upload_file(str(local / rel), bucket, f"in/{rel}")
    return local, bucket


def _cli(
    args: list[str], endpoint: str, tmp: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, **CREDS, **(extra_env or {}), "PYTHONPATH": str(ROOT)}
    env.pop("AWS_ENDPOINT_URL", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "--engine",
            "text",
            "--progress",
            "none",
            "--render-workers",
            "1",
            "--log-file",
            str(tmp / f"log-{uuid.uuid4().hex[:6]}.log"),
            "--s3-endpoint-url",
            endpoint,
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: list[subprocess.Popen[str]], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout))
    return out


def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = _s3(endpoint)
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            found[o["Key"][len(prefix) :]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return found


@pytest.fixture(scope="module")
def local_reference(
    collection: tuple[Path, str], endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    local, _ = collection
    out = tmp_path_factory.mktemp("reference")
    [(rc, log)] = _wait([_cli(["--input-dir", str(local), "--output-dir", str(out)], endpoint, out)])
    assert rc == 0, log
    return out


@pytest.mark.slow
def test_shards_into_one_s3_prefix_match_an_unsharded_local_run(
    collection: tuple[Path, str], endpoint: str, local_reference: Path, tmp_path: Path
) -> None:
    _, bucket = collection
    n = 3
    # All shards at once, as a fleet would: they race on the page-count cache and must still agree.
    procs = [
        _cli(
            [
                "--input-dir",
                f"s3://{bucket}/in",
                "--output-dir",
                f"s3://{bucket}/sharded",
                "--num-shards",
                str(n),
                "--shard-index",
                str(i),
            ],
            endpoint,
            tmp_path,
        )
        for i in range(n)
    ]
    for rc, log in _wait(procs):
        assert rc == 0, log
    objs = _objects(endpoint, bucket, "sharded/")
    ref_md = {
        p.relative_to(local_reference).as_posix(): p.read_bytes() for p in local_reference.rglob("*.md")
    }
    got_md = {k: v for k, v in objs.items() if k.endswith(".md")}
    assert len(ref_md) == len(COLLECTION)
    assert got_md == ref_md  # identical Markdown per document
    assert len([k for k in objs if k.endswith(".done")]) == len(COLLECTION)

    # Every input exactly once across the shard summaries, and the balance is recorded.
    summaries = [json.loads(objs[f"_run_summary.shard-{i}-of-{n}.json"]) for i in range(n)]
    sources = [d["source"] for s in summaries for d in s["docs"]]
    assert sorted(sources) == sorted(f"s3://{bucket}/in/{rel}" for rel in COLLECTION)
    balance = summaries[0]["shard_balance"]
    assert sum(balance["pages_per_shard"]) == sum(COLLECTION.values())
    assert balance["max_pages"] == 6  # the 6-page report alone on one shard, the rest spread over two
    assert [s["shard_balance"] for s in summaries] == [balance] * n
    assert "e2e-secret-not-logged" not in b"".join(objs.values()).decode("utf-8", "replace")

    # A rerun of one shard skips everything it already finished.
    [(rc, log)] = _wait(
        [
            _cli(
                [
                    "--input-dir",
                    f"s3://{bucket}/in",
                    "--output-dir",
                    f"s3://{bucket}/sharded",
                    "--num-shards",
                    str(n),
                    "--shard-index",
                    "1",
                ],
                endpoint,
                tmp_path,
            )
        ]
    )
    assert rc == 0, log
    again = json.loads(_objects(endpoint, bucket, "sharded/")["_run_summary.shard-1-of-3.json"])
    assert again["files"]["ok"] == 0 and again["files"]["skipped"] == summaries[1]["files"]["ok"]


@pytest.mark.slow
def test_multi_gpu_launcher_with_fake_gpus_and_resume(
    collection: tuple[Path, str], endpoint: str, local_reference: Path, tmp_path: Path
) -> None:
    _, bucket = collection
    args = ["--input-dir", f"s3://{bucket}/in", "--output-dir", f"s3://{bucket}/gpus", "--gpus", "0,1"]
    [(rc, log)] = _wait([_cli(args, endpoint, tmp_path, {"CUDA_VISIBLE_DEVICES": ""})])
    assert rc == 0, log
    assert "merged 2/2 shard summaries" in log
    objs = _objects(endpoint, bucket, "gpus/")
    merged = json.loads(objs["_run_summary.json"])
    assert merged["files"]["ok"] == len(COLLECTION) and merged["pages_total"] == sum(COLLECTION.values())
    assert [w["exit_code"] for w in merged["workers"]] == [0, 0]
    assert {k: v for k, v in objs.items() if k.endswith(".md")} == {
        p.relative_to(local_reference).as_posix(): p.read_bytes() for p in local_reference.rglob("*.md")
    }

    # A worker "crashed" before finishing one document: its outputs and done marker are missing.
    s3 = _s3(endpoint)
    for suffix in (".md", ".done", ".pages.jsonl"):
        s3.delete_object(Bucket=bucket, Key=f"gpus/a/report{suffix}")
    [(rc, log)] = _wait([_cli(args, endpoint, tmp_path, {"CUDA_VISIBLE_DEVICES": ""})])
    assert rc == 0, log
    objs = _objects(endpoint, bucket, "gpus/")
    merged = json.loads(objs["_run_summary.json"])
    assert merged["files"]["ok"] == 1 and merged["files"]["skipped"] == len(COLLECTION) - 1
    assert objs["a/report.md"] == (local_reference / "a" / "report.md").read_bytes()
