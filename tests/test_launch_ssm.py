"""aws/launch_ssm.py: global shard plan, the exact commands (dry run), secrets kept out of commands,
and the launch/status flow against botocore's Stubber (real request/response validation)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

boto3 = pytest.importorskip("boto3")
from botocore.stub import ANY, Stubber  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("launch_ssm", ROOT / "aws" / "launch_ssm.py")
assert spec is not None and spec.loader is not None
launch_ssm = importlib.util.module_from_spec(spec)
sys.modules["launch_ssm"] = launch_ssm
spec.loader.exec_module(launch_ssm)

IN, OUT = "s3://corpus/pdfs", "s3://results/md"
CMD_PRE = "11111111-1111-4111-8111-111111111111"
CMD_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
CMD_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
C1 = "c1c1c1c1-c1c1-4c1c-8c1c-c1c1c1c1c1c1"


class FakeSession:
    """Hands out stubbed clients; fails the test if a client that was not prepared is asked for."""

    def __init__(self, **clients: Any) -> None:
        self.clients = clients

    def client(self, name: str) -> Any:
        if name not in self.clients:
            raise AssertionError(f"unexpected AWS client {name!r}")
        return self.clients[name]


def _client(name: str) -> Any:
    return boto3.session.Session().client(
        name,
        region_name="us-east-1",
        aws_access_key_id="AKIAFAKEFAKEFAKEFAKE",
        aws_secret_access_key="fake-secret-never-in-commands",
    )


@given(
    st.dictionaries(
        st.from_regex(r"i-[0-9a-f]{8}", fullmatch=True), st.integers(1, 8), min_size=1, max_size=6
    )
)
def test_plan_numbers_shards_globally_once(instances: dict[str, int]) -> None:
    workers = launch_ssm.plan(instances)
    assert sorted(w.shard_index for w in workers) == list(range(sum(instances.values())))
    assert {w.num_shards for w in workers} == {sum(instances.values())}
    ids = [w.instance_id for w in workers]
    assert ids == sorted(ids)  # instances in id order: the numbering does not depend on input order
    assert launch_ssm.plan(dict(reversed(list(instances.items())))) == workers


def test_dry_run_prints_exact_commands_without_calling_aws(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-must-not-leak")
    code = launch_ssm.main(
        [
            "launch",
            "--input",
            IN,
            "--output",
            OUT,
            "--instance-ids",
            "i-2",
            "i-1",
            "--gpus-per-instance",
            "2",
            "--run-id",
            "t1",
            "--timeout-s",
            "3600",
            "--dry-run",
            "--",
            "--model",
            "/opt/models/DeepSeek-OCR",
        ],
        session=FakeSession(),
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "env-secret-must-not-leak" not in out and "AWS_SECRET" not in out
    workers = [ln for ln in out.splitlines() if ln.startswith("CUDA_VISIBLE_DEVICES=")]
    assert len(workers) == 4
    for k, line in enumerate(workers):
        assert f"--num-shards 4 --shard-index {k} " in line
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={k % 2} timeout --kill-after=120 3600 ")
        assert "--model /opt/models/DeepSeek-OCR" in line and line.endswith("2>&1 &")
    # i-1 sorts first, so it holds shards 0 and 1; the prescan runs there too.
    assert out.index("# --- i-1: shards 0..1") < out.index("# --- i-2: shards 2..3")
    assert "-m runner.shard --input-dir s3://corpus/pdfs --output-dir s3://results/md --num-shards 4" in out
    # Every instance script is valid POSIX sh.
    scripts = out.split("# --- ")[2:]
    for script in scripts:
        body = "\n".join(ln for ln in script.splitlines()[1:] if not ln.startswith("#"))
        subprocess.run(["sh", "-n"], input=body, text=True, check=True)


@pytest.mark.parametrize(
    "extra",
    [
        ["--password", "hunter2"],
        ["--hf-token=abc"],
        ["AKIAABCDEFGHIJKLMNOP"],
        ["--output-dir", "s3://elsewhere"],
        ["--num-shards=3"],
    ],
)
def test_secret_or_reserved_extra_args_are_refused(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = launch_ssm.main(
        [
            "launch",
            "--input",
            IN,
            "--output",
            OUT,
            "--instance-ids",
            "i-1",
            "--gpus-per-instance",
            "1",
            "--dry-run",
            "--",
            *extra,
        ],
        session=FakeSession(),
    )
    assert code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and captured.out == ""
    assert "hunter2" not in captured.err


def _invocation(command_id: str, iid: str, status: str, stdout: str = "") -> dict[str, Any]:
    return {
        "CommandId": command_id,
        "InstanceId": iid,
        "Status": status,
        "StandardOutputContent": stdout,
        "StandardErrorContent": "",
    }


def test_launch_by_tag_with_auto_gpus_then_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ec2, ssm = _client("ec2"), _client("ssm")
    with Stubber(ec2) as e, Stubber(ssm) as s:
        e.add_response(
            "describe_instances",
            {
                "Reservations": [
                    {
                        "Instances": [
                            {"InstanceId": "i-b", "InstanceType": "g6e.12xlarge"},
                            {"InstanceId": "i-a", "InstanceType": "p5.48xlarge"},
                        ]
                    }
                ]
            },
            {
                "Filters": [
                    {"Name": "instance-state-name", "Values": ["running"]},
                    {"Name": "tag:Project", "Values": ["ocr"]},
                ]
            },
        )
        e.add_response(
            "describe_instance_types",
            {
                "InstanceTypes": [
                    {"InstanceType": "g6e.12xlarge", "GpuInfo": {"Gpus": [{"Count": 4, "Name": "L40S"}]}},
                    {"InstanceType": "p5.48xlarge", "GpuInfo": {"Gpus": [{"Count": 8, "Name": "H100"}]}},
                ]
            },
            {"InstanceTypes": ["g6e.12xlarge", "p5.48xlarge"]},
        )
        # 1) the prescan on the first instance, polled until it succeeds
        s.add_response(
            "send_command",
            {"Command": {"CommandId": CMD_PRE}},
            {
                "InstanceIds": ["i-a"],
                "DocumentName": "AWS-RunShellScript",
                "Comment": ANY,
                "Parameters": ANY,
                "TimeoutSeconds": 600,
            },
        )
        s.add_client_error(
            "get_command_invocation",
            "InvocationDoesNotExist",
            http_status_code=400,
            expected_params={"CommandId": CMD_PRE, "InstanceId": "i-a"},
        )
        s.add_response(
            "get_command_invocation",
            _invocation(CMD_PRE, "i-a", "Success", "{}"),
            {"CommandId": CMD_PRE, "InstanceId": "i-a"},
        )
        # 2) one command per instance, 8 + 4 workers, output to CloudWatch and S3
        for iid, cid in (("i-a", CMD_A), ("i-b", CMD_B)):
            s.add_response(
                "send_command",
                {"Command": {"CommandId": cid}},
                {
                    "InstanceIds": [iid],
                    "DocumentName": "AWS-RunShellScript",
                    "Comment": ANY,
                    "Parameters": ANY,
                    "TimeoutSeconds": 600,
                    "CloudWatchOutputConfig": {
                        "CloudWatchLogGroupName": "/ocr/runs",
                        "CloudWatchOutputEnabled": True,
                    },
                    "OutputS3BucketName": "ops-logs",
                    "OutputS3KeyPrefix": "ssm/r1",
                },
            )
        state_file = tmp_path / "r1.json"
        code = launch_ssm.main(
            [
                "launch",
                "--input",
                IN,
                "--output",
                OUT,
                "--tag",
                "Project=ocr",
                "--run-id",
                "r1",
                "--cloudwatch-log-group",
                "/ocr/runs",
                "--s3-output",
                "s3://ops-logs/ssm",
                "--state-file",
                str(state_file),
                "--poll-s",
                "0",
            ],
            session=FakeSession(ec2=ec2, ssm=ssm),
        )
        assert code == 0
        e.assert_no_pending_responses()
        s.assert_no_pending_responses()
    state = json.loads(state_file.read_text())
    assert state["num_shards"] == 12
    assert [(i["instance_id"], len(i["workers"])) for i in state["instances"]] == [("i-a", 8), ("i-b", 4)]
    assert [w["shard_index"] for w in state["instances"][1]["workers"]] == [8, 9, 10, 11]

    # status: i-a finished fine, i-b had one timeout, one failure, two ok
    ok_a = "\n".join(f"WORKER shard={k} of=12 gpu={k} rc=0" for k in range(8))
    b_out = (
        "WORKER shard=8 of=12 gpu=0 rc=0\nWORKER shard=9 of=12 gpu=1 rc=124\n"
        "WORKER shard=10 of=12 gpu=2 rc=1\n--- tail\nWORKER shard=11 of=12 gpu=3 rc=0\n"
    )
    with Stubber(ssm) as s:
        s.add_response(
            "get_command_invocation",
            _invocation(CMD_A, "i-a", "Success", ok_a),
            {"CommandId": CMD_A, "InstanceId": "i-a"},
        )
        s.add_response(
            "get_command_invocation",
            _invocation(CMD_B, "i-b", "Failed", b_out),
            {"CommandId": CMD_B, "InstanceId": "i-b"},
        )
        capsys.readouterr()
        code = launch_ssm.main(["status", "--state-file", str(state_file)], session=FakeSession(ssm=ssm))
    assert code == 1
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.endswith("  ok") for ln in lines) == 10
    assert any("shard 9-of-12" in ln and ln.endswith("timeout") for ln in lines)
    assert any("shard 10-of-12" in ln and ln.endswith("failed (exit 1)") for ln in lines)
    assert lines[-1] == "10/12 ok"


def test_status_reports_running_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = {
        "instances": [
            {
                "instance_id": "i-a",
                "command_id": C1,
                "workers": [
                    {"instance_id": "i-a", "gpu": 0, "shard_index": 0, "num_shards": 2},
                    {"instance_id": "i-a", "gpu": 1, "shard_index": 1, "num_shards": 2},
                ],
            }
        ]
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps(state))
    ssm = _client("ssm")
    with Stubber(ssm) as s:
        s.add_response(
            "get_command_invocation",
            _invocation(C1, "i-a", "InProgress"),
            {"CommandId": C1, "InstanceId": "i-a"},
        )
        assert launch_ssm.main(["status", "--state-file", str(path)], session=FakeSession(ssm=ssm)) == 4
    assert capsys.readouterr().out.count("running") == 2


def test_failed_prescan_stops_the_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ssm = _client("ssm")
    with Stubber(ssm) as s:
        s.add_response("send_command", {"Command": {"CommandId": CMD_PRE}})
        s.add_response(
            "get_command_invocation",
            {
                **_invocation(CMD_PRE, "i-1", "Failed"),
                "StandardErrorContent": "AccessDenied on ListObjectsV2",
            },
        )
        code = launch_ssm.main(
            [
                "launch",
                "--input",
                IN,
                "--output",
                OUT,
                "--instance-ids",
                "i-1",
                "--gpus-per-instance",
                "2",
                "--poll-s",
                "0",
                "--state-file",
                str(tmp_path / "x.json"),
            ],
            session=FakeSession(ec2=_stub_running(["i-1"]), ssm=ssm),
        )
        s.assert_no_pending_responses()  # and no worker command was sent after the failure
    assert code == 2
    assert "AccessDenied" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _stub_running(ids: list[str]) -> Any:
    ec2 = _client("ec2")
    stub = Stubber(ec2)
    stub.add_response(
        "describe_instances",
        {"Reservations": [{"Instances": [{"InstanceId": i, "InstanceType": "g5.xlarge"} for i in ids]}]},
    )
    stub.activate()
    return ec2


def test_missing_instances_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code = launch_ssm.main(
        [
            "launch",
            "--input",
            IN,
            "--output",
            OUT,
            "--instance-ids",
            "i-1",
            "i-2",
            "--gpus-per-instance",
            "1",
        ],
        session=FakeSession(ec2=_stub_running(["i-1"])),
    )
    assert code == 2
    assert "i-2" in capsys.readouterr().err


def test_help_does_not_import_boto3() -> None:
    code = (
        "import sys, runpy; sys.argv=['launch_ssm.py','--help']\n"
        "try:\n runpy.run_path('aws/launch_ssm.py', run_name='__main__')\nexcept SystemExit: pass\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "launch" in res.stdout and "status" in res.stdout
