"""`hyperjob cluster ...` through the CLI in a subprocess, against a real moto server: the acceptance flow (create,
status, nodes, an idempotent second create, delete), refusals, init, ssh-config --write, and lazy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from fixtures_moto import MOTO_REGION
from run_helpers import REPO, hyperjob

from hyperjob.cli.cmd_cluster import replace_block

EXAMPLE = REPO / "examples" / "hyperpod-trn1.yaml"
MOTO = ["--set", "fsx.mode=none"]  # moto cannot create FSx in CloudFormation
NAME = "hyperjob-trn1"
STACK = f"{NAME}-stack"


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with the environment aws_env set up (os.environ), stdin not a terminal."""
    env = {"HOME": str(home)} if home else None
    return hyperjob("cluster", *args, env=env, timeout=120)


def _objects(bucket: str) -> dict[str, object]:
    s3 = boto3.client("s3", region_name=MOTO_REGION)
    return {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_acceptance_flow_create_status_nodes_recreate_delete(aws_env: str, tmp_path: Path) -> None:
    sagemaker = boto3.client("sagemaker", region_name=MOTO_REGION)
    cfn = boto3.client("cloudformation", region_name=MOTO_REGION)

    out = cli("create", str(EXAMPLE), "--yes", *MOTO)
    assert out.returncode == 0, out.stderr
    assert f"cluster {NAME} InService" in out.stdout
    (stack,) = cfn.describe_stacks(StackName=STACK)["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    bucket = outputs["AmazonS3BucketName"]
    objects = _objects(bucket)
    assert any(key.endswith("/on_create.sh") for key in objects), sorted(objects)
    assert any(key.endswith("/cluster_groups.json") for key in objects), sorted(objects)
    assert [c["ClusterName"] for c in sagemaker.list_clusters()["ClusterSummaries"]] == [NAME]

    status = cli("status", str(EXAMPLE), "--json", *MOTO)
    assert status.returncode == 0, status.stderr
    described = json.loads(status.stdout)
    assert described["ClusterStatus"] == "InService" and described["ClusterName"] == NAME
    assert isinstance(described["CreationTime"], str) and described["CreationTime"][:4].isdigit()
    text = cli("status", str(EXAMPLE), *MOTO)
    assert text.returncode == 0 and "InService: controller-machine" in text.stdout, text.stdout

    nodes = cli("nodes", str(EXAMPLE), "--json", *MOTO)
    assert nodes.returncode == 0, nodes.stderr
    groups = {n["InstanceGroupName"] for n in json.loads(nodes.stdout)}
    assert groups == {"controller-machine", "login-group", "trn1-workers"}
    table = cli("nodes", str(EXAMPLE), *MOTO)
    assert table.stdout.splitlines()[0].split() == ["group", "instance", "id", "status", "type", "launch", "time"]

    again = cli("create", str(EXAMPLE), "--yes", *MOTO)
    assert again.returncode == 0, again.stderr
    assert f"stack {STACK} unchanged" in again.stdout
    assert "uploaded nothing" in again.stdout and " 0 uploaded" in again.stdout
    assert f"cluster {NAME} exists (InService): nothing created" in again.stdout
    assert len(sagemaker.list_clusters()["ClusterSummaries"]) == 1
    assert _objects(bucket) == objects  # same keys, same LastModified: nothing re-sent

    gone = cli("delete", str(EXAMPLE), "--yes", *MOTO)
    assert gone.returncode == 0, gone.stderr
    assert sagemaker.list_clusters()["ClusterSummaries"] == []
    stacks = cfn.list_stacks()["StackSummaries"]
    assert all(s["StackStatus"] == "DELETE_COMPLETE" for s in stacks if s["StackName"] == STACK)
    after = cli("status", str(EXAMPLE), *MOTO)
    assert after.returncode == 1 and f"no cluster named {NAME}" in after.stderr


def test_create_without_yes_and_no_terminal_refuses_and_creates_nothing(aws_env: str) -> None:
    out = cli("create", str(EXAMPLE), *MOTO)
    assert out.returncode == 2
    assert "stdin is not a terminal" in out.stderr and "--yes" in out.stderr
    assert "CloudFormation stack hyperjob-trn1-stack" in out.stdout  # what would have been created
    assert boto3.client("sagemaker", region_name=MOTO_REGION).list_clusters()["ClusterSummaries"] == []
    assert boto3.client("cloudformation", region_name=MOTO_REGION).list_stacks()["StackSummaries"] == []
    delete = cli("delete", str(EXAMPLE), *MOTO)
    assert delete.returncode == 2 and "--yes" in delete.stderr


def test_a_bad_key_is_named_and_exits_2(tmp_path: Path) -> None:
    out = cli("validate", str(EXAMPLE), "--set", "workers.0.count=-1", *MOTO)
    assert out.returncode == 2
    assert "workers.0.count" in out.stderr and "Traceback" not in out.stderr


def test_validate_before_the_stack_exists_then_preflight_after(aws_env: str) -> None:
    first = cli("validate", str(EXAMPLE), *MOTO)
    assert first.returncode == 0 and "does not exist yet" in first.stdout, first.stderr
    assert cli("create", str(EXAMPLE), "--yes", "--no-wait", *MOTO).returncode == 0
    second = cli("validate", str(EXAMPLE), *MOTO)
    # moto's stack gives preflight real things to find (no EFA egress rule, types not offered in its AZ)
    lines = second.stdout.splitlines()
    problems = [line for line in lines if not line.startswith("note:")]
    assert second.returncode == 1 and problems and "ok" not in lines, second.stdout
    assert any("lacks the EFA egress rule" in line for line in problems), problems


def test_missing_credentials_are_one_line_with_a_hint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    none = str(tmp_path / "none")
    env |= {"AWS_CONFIG_FILE": none, "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "hyperjob", "cluster", "status", str(EXAMPLE)], capture_output=True,
                         text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "configure credentials" in out.stderr, out.stderr


def test_init_writes_the_example_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "c.yaml"
    assert cli("init", "--output", str(target)).returncode == 0
    assert target.read_text() == EXAMPLE.read_text()
    target.write_text("mine\n")
    refused = cli("init", "--output", str(target))
    assert refused.returncode == 2 and "--force" in refused.stderr and target.read_text() == "mine\n"
    assert cli("init", "--output", str(target), "--force").returncode == 0
    assert target.read_text() == EXAMPLE.read_text()


def test_ssh_config_write_twice_leaves_one_block(aws_env: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host mine\n    User me\n")
    assert cli("create", str(EXAMPLE), "--yes", *MOTO).returncode == 0
    printed = cli("ssh-config", str(EXAMPLE), *MOTO, home=home)
    assert printed.returncode == 0 and f"Host {NAME}-controller-machine-1 {NAME}-controller" in printed.stdout
    for _ in range(2):
        out = cli("ssh-config", str(EXAMPLE), "--write", *MOTO, home=home)
        assert out.returncode == 0, out.stderr
    text = (home / ".ssh" / "config").read_text()
    assert text.startswith("Host mine\n    User me\n")
    assert text.count(f"# BEGIN hyperjob {NAME}") == 1 and text.count(f"# END hyperjob {NAME}") == 1
    assert text.count(f"Host {NAME}-controller-machine-1 ") == 1
    assert printed.stdout.strip() in text
    assert (home / ".ssh" / "config").stat().st_mode & 0o777 == 0o600


def test_replace_block_replaces_only_its_own_cluster() -> None:
    one = replace_block("", "a", "Host a1\n")
    two = replace_block(one, "b", "Host b1\n")
    three = replace_block(two, "a", "Host a2\n")
    assert three == "# BEGIN hyperjob a\nHost a2\n# END hyperjob a\n\n# BEGIN hyperjob b\nHost b1\n# END hyperjob b\n"


def test_cluster_help_lists_the_subcommands() -> None:
    out = hyperjob("cluster", "--help")
    assert out.returncode == 0, out.stderr
    for name in ("init", "validate", "create", "status", "nodes", "ssh-config", "delete"):
        assert f"    {name} " in out.stdout, name


@pytest.mark.parametrize("argv", [["--help"], ["cluster", "--help"], ["cluster", "init", "--help"]])
def test_help_imports_no_boto3(argv: list[str]) -> None:
    code = (
        "import sys\nfrom hyperjob.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
