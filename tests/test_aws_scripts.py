"""aws/: the bootstrap script parses and passes shellcheck, stops early on a machine without a
working driver, and the IAM policies are valid JSON scoped to the input/output prefixes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "aws"
SETUP = AWS / "setup_multi_gpu_env.sh"


def _launch_ssm() -> Any:
    spec = importlib.util.spec_from_file_location("launch_ssm_for_iam", AWS / "launch_ssm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_setup_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SETUP)], check=True)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
def test_setup_script_passes_shellcheck() -> None:
    res = subprocess.run(["shellcheck", "--severity=style", str(SETUP)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _run_setup(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if nvidia_smi is not None:
        fake = bindir / "nvidia-smi"
        fake.write_text(nvidia_smi)
        fake.chmod(0o755)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VENV_DIR": str(tmp_path / "venv"),
        "MODEL_DIR": str(tmp_path / "model"),
        "LOG_ROOT": str(tmp_path / "logs"),
    }
    return subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)


def test_setup_script_refuses_a_machine_without_driver(tmp_path: Path) -> None:
    res = _run_setup(tmp_path, None)
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("this machine has a system nvidia-smi")
    assert res.returncode == 1
    assert "nvidia-smi not found" in res.stderr
    assert not (tmp_path / "venv").exists()  # nothing was created before the check


def test_setup_script_refuses_a_driver_that_lists_no_gpu(tmp_path: Path) -> None:
    res = _run_setup(tmp_path, "#!/bin/sh\nexit 0\n")
    assert res.returncode == 1
    assert "lists no GPU" in res.stderr
    assert not (tmp_path / "venv").exists()


def _statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    assert policy["Version"] == "2012-10-17"
    return list(policy["Statement"])


def _as_list(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


@pytest.mark.parametrize("name", sorted(p.name for p in (AWS / "iam").glob("*.json")))
def test_policy_templates_are_valid_json(name: str) -> None:
    policy = json.loads((AWS / "iam" / name).read_text())
    for s in _statements(policy):
        assert s["Effect"] == "Allow" and s["Action"] and s["Resource"]
        assert not any(a.endswith(":*") or a == "*" for a in _as_list(s["Action"])), s


def test_worker_policy_reads_input_writes_output_nothing_else() -> None:
    policies = _launch_ssm().render_policies(
        "s3://corpus/pdfs/2026", "s3://results/md", "eu-west-1", "123456789012"
    )
    worker = policies["worker-policy.json"]
    text = json.dumps(worker)
    assert "${" not in text
    actions: dict[str, set[str]] = {}
    for s in _statements(worker):
        for r in _as_list(s["Resource"]):
            actions.setdefault(r, set()).update(_as_list(s["Action"]))
            assert r != "*" and "/*/" not in r
    assert actions["arn:aws:s3:::corpus/pdfs/2026/*"] == {"s3:GetObject"}  # read-only input
    assert actions["arn:aws:s3:::corpus"] == {"s3:ListBucket"}
    assert "s3:PutObject" in actions["arn:aws:s3:::results/md/*"]
    assert "s3:DeleteObject" not in {
        a for r, acts in actions.items() if r.startswith("arn:aws:s3:::corpus") for a in acts
    }
    assert all(a.startswith("s3:") for acts in actions.values() for a in acts)
    # Listing is limited to the prefixes by condition, never the whole bucket.
    for s in _statements(worker):
        if "s3:ListBucket" in _as_list(s["Action"]):
            prefixes = s["Condition"]["StringLike"]["s3:prefix"]
            assert all(p.startswith(("pdfs/2026/", "md/")) for p in prefixes), prefixes


def test_launcher_policy_is_limited_to_the_document_and_tagged_instances() -> None:
    launcher = _launch_ssm().render_policies(
        "s3://a/in", "s3://b/out", "us-east-1", "123456789012", "Team=ocr"
    )["launcher-policy.json"]
    send = [s for s in _statements(launcher) if "ssm:SendCommand" in _as_list(s["Action"])]
    resources = {r for s in send for r in _as_list(s["Resource"])}
    assert resources == {
        "arn:aws:ssm:us-east-1::document/AWS-RunShellScript",
        "arn:aws:ec2:us-east-1:123456789012:instance/*",
    }
    inst = next(s for s in send if s["Resource"].startswith("arn:aws:ec2"))
    assert inst["Condition"] == {"StringEquals": {"ssm:resourceTag/Team": "ocr"}}
    all_actions = {a for s in _statements(launcher) for a in _as_list(s["Action"])}
    assert all_actions == {
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
        "ssm:ListCommandInvocations",
        "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes",
    }
    assert not any(a.startswith("s3:") or a.startswith("iam:") for a in all_actions)


def test_whole_bucket_prefix_renders_without_a_leading_slash() -> None:
    worker = _launch_ssm().render_policies("s3://in-bucket", "s3://out-bucket/x")["worker-policy.json"]
    resources = {r for s in _statements(worker) for r in _as_list(s["Resource"])}
    assert "arn:aws:s3:::in-bucket/*" in resources and "arn:aws:s3:::out-bucket/x/*" in resources


def test_iam_subcommand_prints_both_policies() -> None:
    res = subprocess.run(
        [sys.executable, str(AWS / "launch_ssm.py"), "iam", "--input", "s3://a/in", "--output", "s3://b/out"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) == {"worker-policy.json", "launcher-policy.json"}
