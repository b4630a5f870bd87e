#!/usr/bin/env python3
"""Fleet launch over AWS Systems Manager: one OCR worker per GPU across many instances.

Stage: launch (outside the pipeline). In: S3 input/output prefixes, the target instances (ids or a
tag), GPUs per instance. Out: one ``AWS-RunShellScript`` command per instance that starts one
``python -m runner`` worker per GPU, each with ``CUDA_VISIBLE_DEVICES`` and a *global* shard index
(instances sorted by id, then GPU order: instance j's GPU g is shard ``offset_j + g`` of the total),
each wrapped in ``timeout``; a state file recording the command ids; and ``status``, which polls the
invocations and reports every worker's outcome (the script prints one ``WORKER`` line per worker).

Security: workers authenticate with the instance role; nothing secret is ever put in a command
(extra runner arguments that look like credentials or a PDF password are refused). ``--dry-run``
prints the exact commands without sending anything. boto3 is imported only when AWS is called.

    python aws/launch_ssm.py launch --input s3://in/pdfs --output s3://out/md --tag Project=ocr \
        --gpus-per-instance 8 --dry-run -- --model /opt/models/DeepSeek-OCR
    python aws/launch_ssm.py status --state-file ocr-launch.json --wait
    python aws/launch_ssm.py iam --input s3://in/pdfs --output s3://out/md   # render the IAM policies
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    from runner.storage_s3 import parse_s3_uri
except ImportError:  # run as ``python aws/launch_ssm.py`` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from runner.storage_s3 import parse_s3_uri

HERE = Path(__file__).resolve().parent
DOCUMENT = "AWS-RunShellScript"
LOG_ROOT = "/var/log/deepseek-ocr"
TERMINAL = {
    "Success",
    "Failed",
    "TimedOut",
    "Cancelled",
    "Undeliverable",
    "Terminated",
    "DeliveryTimedOut",
    "ExecutionTimedOut",
    "InvalidPlatform",
    "AccessDenied",
}
WORKER_LINE = re.compile(r"^WORKER shard=(\d+) of=(\d+) gpu=(\S+) rc=(\d+)\s*$", re.M)
# Extra runner arguments must not carry secrets through SSM (they are stored in the command history).
_SECRET_ARG = re.compile(
    r"(?i)(password|secret|token|credential|aws_access_key|aws_session|"
    r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16})"
)


class LaunchError(RuntimeError):
    """The launch request is invalid or AWS refused it; the message says which."""


@dataclass(frozen=True)
class Worker:
    instance_id: str
    gpu: int
    shard_index: int
    num_shards: int

    @property
    def name(self) -> str:
        return f"shard-{self.shard_index}-of-{self.num_shards}"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that shapes the commands; built from the CLI, validated once."""

    input_uri: str
    output_uri: str
    project_dir: str = "/opt/deepseek-ocr"
    python: str = "/opt/deepseek-ocr/.venv/bin/python"
    timeout_s: int = 24 * 3600
    kill_after_s: int = 120
    run_id: str = "ocr"
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for uri in (self.input_uri, self.output_uri):
            parse_s3_uri(uri)
        if self.timeout_s < 60:
            raise LaunchError("--timeout-s must be >= 60")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.run_id):
            raise LaunchError("--run-id: letters, digits, '.', '_' or '-' (at most 64)")
        for a in self.extra_args:
            if _SECRET_ARG.search(a):
                raise LaunchError(
                    f"refusing to send an argument that looks like a secret ({a.split('=')[0]!r}); "
                    "workers use the instance role, PDF passwords go in a file on the instance"
                )
            if a.split("=")[0] in (
                "--input-dir",
                "--output-dir",
                "--num-shards",
                "--shard-index",
                "--gpus",
                "--input-list",
            ):
                raise LaunchError(f"{a.split('=')[0]} is set by the launcher")


def plan(instance_gpus: dict[str, int]) -> list[Worker]:
    """Global shard numbering: instances sorted by id, GPUs in order, one shard per GPU."""
    if not instance_gpus:
        raise LaunchError("no target instance")
    bad = {i: n for i, n in instance_gpus.items() if n < 1}
    if bad:
        raise LaunchError(f"instances without GPUs: {bad}")
    total = sum(instance_gpus.values())
    workers, k = [], 0
    for iid in sorted(instance_gpus):
        for g in range(instance_gpus[iid]):
            workers.append(Worker(iid, g, k, total))
            k += 1
    return workers


def worker_command(spec: LaunchSpec, w: Worker) -> str:
    """The exact shell line that starts one worker in the background (POSIX sh)."""
    q = shlex.quote
    runner = [
        spec.python,
        "-m",
        "runner",
        "--input-dir",
        spec.input_uri,
        "--output-dir",
        spec.output_uri,
        "--num-shards",
        str(w.num_shards),
        "--shard-index",
        str(w.shard_index),
        "--progress",
        "log",
        *spec.extra_args,
    ]
    log = f"{LOG_ROOT}/{spec.run_id}/{w.name}.log"
    return (
        f"CUDA_VISIBLE_DEVICES={w.gpu} timeout --kill-after={spec.kill_after_s} {spec.timeout_s} "
        f"{' '.join(q(a) for a in runner)} > {q(log)} 2>&1 &"
    )


def prescan_script(spec: LaunchSpec, num_shards: int) -> list[str]:
    """One instance fills the page-count cache in the output prefix before the workers start, so
    they agree on one set of counts and do not each download the whole input to count pages."""
    q = shlex.quote
    cmd = [
        spec.python,
        "-m",
        "runner.shard",
        "--input-dir",
        spec.input_uri,
        "--output-dir",
        spec.output_uri,
        "--num-shards",
        str(num_shards),
    ]
    return [
        "set -eu",
        f"cd {q(spec.project_dir)}",
        f"timeout --kill-after={spec.kill_after_s} {spec.timeout_s} {' '.join(q(a) for a in cmd)}",
    ]


def instance_script(spec: LaunchSpec, workers: list[Worker]) -> list[str]:
    """The ``commands`` parameter of AWS-RunShellScript for one instance."""
    q = shlex.quote
    lines = [
        "set -u",
        f"cd {q(spec.project_dir)}",
        f"mkdir -p {q(f'{LOG_ROOT}/{spec.run_id}')}",
        "export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1",
    ]
    for w in workers:
        lines += [worker_command(spec, w), f"pid_{w.shard_index}=$!"]
    lines.append("rc_all=0")
    for w in workers:
        log = q(f"{LOG_ROOT}/{spec.run_id}/{w.name}.log")
        lines += [
            f"wait $pid_{w.shard_index}; rc=$?",
            f'echo "WORKER shard={w.shard_index} of={w.num_shards} gpu={w.gpu} rc=$rc"',
            f'if [ "$rc" -ne 0 ]; then rc_all=1; echo "--- tail of {w.name}.log"; tail -n 30 {log}; fi',
        ]
    lines.append("exit $rc_all")
    return lines


# -- AWS calls --------------------------------------------------------------------------------------


def _session(region: str | None) -> Any:
    import boto3

    return boto3.session.Session(region_name=region)


def resolve_instances(ec2: Any, instance_ids: list[str], tag: str | None) -> list[dict[str, Any]]:
    """Running instances by id or ``Key=Value`` tag, with their instance types."""
    if bool(instance_ids) == bool(tag):
        raise LaunchError("give --instance-ids or --tag (one of them)")
    filters = [{"Name": "instance-state-name", "Values": ["running"]}]
    kwargs: dict[str, Any] = {"Filters": filters}
    if tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise LaunchError("--tag must be Key=Value")
        filters.append({"Name": f"tag:{key}", "Values": [value]})
    else:
        kwargs["InstanceIds"] = instance_ids
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(**kwargs):
        for res in page.get("Reservations", ()):
            for inst in res.get("Instances", ()):
                found.append({"InstanceId": inst["InstanceId"], "InstanceType": inst["InstanceType"]})
    if instance_ids and len(found) != len(set(instance_ids)):
        missing = sorted(set(instance_ids) - {f["InstanceId"] for f in found})
        raise LaunchError(f"not running or not found: {', '.join(missing)}")
    if not found:
        raise LaunchError(f"no running instance with tag {tag}")
    return sorted(found, key=lambda f: f["InstanceId"])


def gpus_by_type(ec2: Any, types: set[str]) -> dict[str, int]:
    resp = ec2.describe_instance_types(InstanceTypes=sorted(types))
    out = {}
    for t in resp.get("InstanceTypes", ()):
        out[t["InstanceType"]] = sum(int(g.get("Count", 0)) for g in t.get("GpuInfo", {}).get("Gpus", ()))
    return out


def run_prescan(
    ssm: Any, spec: LaunchSpec, instance_id: str, num_shards: int, args: argparse.Namespace
) -> None:
    """Send the page-count prescan to one instance and wait for it to finish."""
    resp = ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName=args.document,
        Comment=f"deepseek-ocr {spec.run_id} page-count prescan"[:100],
        Parameters={
            "commands": prescan_script(spec, num_shards),
            "executionTimeout": [str(spec.timeout_s + spec.kill_after_s + 300)],
        },
        TimeoutSeconds=args.delivery_timeout_s,
    )
    command_id = resp["Command"]["CommandId"]
    print(f"prescan on {instance_id}: command {command_id}", file=sys.stderr)
    while True:
        time.sleep(args.poll_s)
        inv = poll_invocation(ssm, command_id, instance_id)
        if inv.get("Status") in TERMINAL:
            break
    if inv.get("Status") != "Success":
        tail = (inv.get("StandardErrorContent") or inv.get("StandardOutputContent") or "")[-2000:]
        raise LaunchError(f"page-count prescan on {instance_id} ended {inv.get('Status')}: {tail}")


def poll_invocation(ssm: Any, command_id: str, instance_id: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    try:
        inv: dict[str, Any] = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    except ClientError as e:  # SSM needs a moment before an invocation can be read
        if e.response.get("Error", {}).get("Code") != "InvocationDoesNotExist":
            raise
        inv = {"Status": "Pending", "InstanceId": instance_id}
    return inv


def send(ssm: Any, spec: LaunchSpec, workers: list[Worker], args: argparse.Namespace) -> list[dict[str, Any]]:
    by_instance: dict[str, list[Worker]] = {}
    for w in workers:
        by_instance.setdefault(w.instance_id, []).append(w)
    sent = []
    for iid, ws in by_instance.items():
        kwargs: dict[str, Any] = {
            "InstanceIds": [iid],
            "DocumentName": args.document,
            "Comment": f"deepseek-ocr {spec.run_id} shards {ws[0].shard_index}-{ws[-1].shard_index}"[:100],
            "Parameters": {
                "commands": instance_script(spec, ws),
                "executionTimeout": [str(spec.timeout_s + spec.kill_after_s + 300)],
            },
            "TimeoutSeconds": args.delivery_timeout_s,
        }
        if args.cloudwatch_log_group:
            kwargs["CloudWatchOutputConfig"] = {
                "CloudWatchLogGroupName": args.cloudwatch_log_group,
                "CloudWatchOutputEnabled": True,
            }
        if args.s3_output:
            bucket, prefix = parse_s3_uri(args.s3_output)
            kwargs["OutputS3BucketName"] = bucket
            kwargs["OutputS3KeyPrefix"] = f"{prefix}/{spec.run_id}".strip("/")
        resp = ssm.send_command(**kwargs)
        sent.append(
            {
                "instance_id": iid,
                "command_id": resp["Command"]["CommandId"],
                "workers": [asdict(w) for w in ws],
            }
        )
    return sent


def worker_outcomes(invocation: dict[str, Any], workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-worker outcome from one invocation's status and ``WORKER`` lines."""
    status = invocation.get("Status", "Pending")
    rcs = {
        int(m.group(1)): int(m.group(4))
        for m in WORKER_LINE.finditer(invocation.get("StandardOutputContent", ""))
    }
    out = []
    for w in workers:
        rc = rcs.get(int(w["shard_index"]))
        if rc is None:
            outcome = "running" if status not in TERMINAL else f"unknown ({status})"
        elif rc == 0:
            outcome = "ok"
        elif rc in (124, 137):
            outcome = "timeout"
        else:
            outcome = f"failed (exit {rc})"
        out.append(
            {
                "instance_id": invocation.get("InstanceId", w["instance_id"]),
                "gpu": w["gpu"],
                "shard": f"{w['shard_index']}-of-{w['num_shards']}",
                "outcome": outcome,
                "rc": rc,
                "invocation": status,
            }
        )
    return out


def poll_status(ssm: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in state["instances"]:
        inv = poll_invocation(ssm, entry["command_id"], entry["instance_id"])
        rows.extend(worker_outcomes(inv, entry["workers"]))
    return rows


# -- CLI --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_ssm.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    la = sub.add_parser("launch", help="send one command per instance (one worker per GPU)")
    la.add_argument("--input", required=True, help="s3://bucket/prefix with the PDFs")
    la.add_argument("--output", required=True, help="s3://bucket/prefix for Markdown + done markers")
    la.add_argument("--instance-ids", nargs="*", default=[], help="target instance ids")
    la.add_argument("--tag", help="target running instances with this Key=Value tag")
    la.add_argument("--gpus-per-instance", default="auto", help="N, or auto (from the instance type)")
    la.add_argument("--project-dir", default=LaunchSpec.project_dir, help="checkout on the instances")
    la.add_argument("--python", default=LaunchSpec.python, help="interpreter of the project's venv")
    la.add_argument("--timeout-s", type=int, default=LaunchSpec.timeout_s, help="per worker (timeout(1))")
    la.add_argument("--run-id", default=time.strftime("ocr-%Y%m%d-%H%M%S"), help="names logs and S3 output")
    la.add_argument("--document", default=DOCUMENT)
    la.add_argument("--delivery-timeout-s", type=int, default=600, help="SSM: max wait for an agent to start")
    la.add_argument("--cloudwatch-log-group", help="send command output to this CloudWatch Logs group")
    la.add_argument("--s3-output", help="s3://bucket/prefix for SSM command output")
    la.add_argument("--state-file", help="where to record the command ids (default: <run-id>.json)")
    la.add_argument("--region")
    la.add_argument(
        "--no-prescan",
        dest="prescan",
        action="store_false",
        help="skip the page-count prescan on the first instance (each worker then scans)",
    )
    la.add_argument("--poll-s", type=float, default=15.0, help="prescan polling interval")
    la.add_argument("--dry-run", action="store_true", help="print the exact commands, send nothing")
    la.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra arguments for every worker")
    st = sub.add_parser("status", help="per-worker outcome of a launch")
    st.add_argument("--state-file", required=True)
    st.add_argument("--region")
    st.add_argument("--wait", action="store_true", help="poll until every invocation is finished")
    st.add_argument("--poll-s", type=float, default=30.0)
    ia = sub.add_parser("iam", help="print the worker and launcher policies for these prefixes")
    ia.add_argument("--input", required=True)
    ia.add_argument("--output", required=True)
    ia.add_argument("--region", default="*")
    ia.add_argument("--account", default="*")
    ia.add_argument("--tag", default="Project=deepseek-ocr", help="Key=Value tag the launcher may target")
    return p


def render_policies(
    input_uri: str, output_uri: str, region: str = "*", account: str = "*", tag: str = "Project=deepseek-ocr"
) -> dict[str, Any]:
    """The IAM templates in ``aws/iam/`` with buckets, prefixes, region, account and tag filled in."""
    ib, ip = parse_s3_uri(input_uri)
    ob, op = parse_s3_uri(output_uri)
    tag_key, _, tag_value = tag.partition("=")
    subs = {
        "INPUT_BUCKET": ib,
        "INPUT_PREFIX": ip,
        "OUTPUT_BUCKET": ob,
        "OUTPUT_PREFIX": op,
        "REGION": region,
        "ACCOUNT_ID": account,
        "TAG_KEY": tag_key,
        "TAG_VALUE": tag_value,
    }
    out = {}
    for name in ("worker-policy.json", "launcher-policy.json"):
        text = (HERE / "iam" / name).read_text()
        for k, v in subs.items():
            if k.endswith("_PREFIX"):  # an empty prefix means the whole bucket, not "/"
                text = text.replace("${" + k + "}/", f"{v}/" if v else "")
            text = text.replace("${" + k + "}", v)
        out[name] = json.loads(text)
    return out


def _launch(args: argparse.Namespace, session: Any) -> int:
    extra = list(args.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    spec = LaunchSpec(
        input_uri=args.input,
        output_uri=args.output,
        project_dir=args.project_dir,
        python=args.python,
        timeout_s=args.timeout_s,
        run_id=args.run_id,
        extra_args=tuple(extra),
    )
    fixed = None if args.gpus_per_instance == "auto" else int(args.gpus_per_instance)
    if args.dry_run and args.instance_ids and not args.tag and fixed is not None:
        instances = [{"InstanceId": i, "InstanceType": "?"} for i in sorted(set(args.instance_ids))]
    else:
        ec2 = session.client("ec2")
        instances = resolve_instances(ec2, args.instance_ids, args.tag)
        if fixed is None:
            per_type = gpus_by_type(ec2, {i["InstanceType"] for i in instances})
            for i in instances:
                i["Gpus"] = per_type.get(i["InstanceType"], 0)
    counts = {i["InstanceId"]: (fixed if fixed is not None else int(i.get("Gpus", 0))) for i in instances}
    workers = plan(counts)
    if args.dry_run:
        by_instance: dict[str, list[Worker]] = {}
        for w in workers:
            by_instance.setdefault(w.instance_id, []).append(w)
        print(f"# dry run: {len(workers)} worker(s) on {len(by_instance)} instance(s), run {spec.run_id}")
        if args.prescan:
            print(f"# --- {workers[0].instance_id}: page-count prescan, waited for before the workers start")
            print("\n".join(prescan_script(spec, len(workers))))
        for iid, ws in by_instance.items():
            print(
                f"# --- {iid}: shards {ws[0].shard_index}..{ws[-1].shard_index} of {ws[0].num_shards} "
                f"({DOCUMENT if args.document == DOCUMENT else args.document})"
            )
            print("\n".join(instance_script(spec, ws)))
        return 0
    ssm = session.client("ssm")
    if args.prescan:
        run_prescan(ssm, spec, workers[0].instance_id, len(workers), args)
    sent = send(ssm, spec, workers, args)
    state = {
        "run_id": spec.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": spec.input_uri,
        "output": spec.output_uri,
        "num_shards": len(workers),
        "instances": sent,
    }
    path = Path(args.state_file or f"{spec.run_id}.json")
    path.write_text(json.dumps(state, indent=1))
    print(f"sent {len(sent)} command(s) for {len(workers)} worker(s); state in {path}")
    print(f"follow with: python aws/launch_ssm.py status --state-file {path} --wait")
    return 0


def _status(args: argparse.Namespace, session: Any) -> int:
    state = json.loads(Path(args.state_file).read_text())
    ssm = session.client("ssm")
    while True:
        rows = poll_status(ssm, state)
        pending = [r for r in rows if r["invocation"] not in TERMINAL]
        if not args.wait or not pending:
            break
        print(
            f"{len(rows) - len(pending)}/{len(rows)} worker(s) finished; polling again in {args.poll_s:.0f}s",
            file=sys.stderr,
        )
        time.sleep(args.poll_s)
    width = max((len(r["instance_id"]) for r in rows), default=10)
    for r in rows:
        print(f"{r['instance_id']:<{width}}  gpu {r['gpu']}  shard {r['shard']:<9}  {r['outcome']}")
    ok = sum(r["outcome"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} ok")
    if any(r["outcome"] not in ("ok", "running") for r in rows):
        return 1
    return 0 if ok == len(rows) else 4  # 4: still running


def main(argv: list[str] | None = None, session: Any = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "iam":
            print(
                json.dumps(
                    render_policies(args.input, args.output, args.region, args.account, args.tag), indent=1
                )
            )
            return 0
        sess = session if session is not None else _session(args.region)
        return _launch(args, sess) if args.cmd == "launch" else _status(args, sess)
    except (LaunchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
