"""hyperjob.aws.stack and hyperjob.aws.upload: the stack's lifecycle and the scripts' upload.

On moto's real server (fixture `aws_env`): create, no-op, update, upload with sha256, delete with the end state
checked, a foreign stack refused. With botocore's Stubber (the real service model): what moto cannot do, a rollback
and a refused call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from hyperjob.aws import request, stack, upload
from hyperjob.aws.cluster_config import ClusterConfig, load_cluster_config
from hyperjob.aws.errors import AwsError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hyperpod-trn1.yaml"
MOTO = ["fsx.mode=none"]  # moto cannot create FSx in CloudFormation


def config(*overrides: str) -> ClusterConfig:
    return load_cluster_config(EXAMPLE, [*MOTO, *overrides])


class Log(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A copy of the shipped scripts, so a test can change one."""
    dest = tmp_path / "scripts"
    shutil.copytree(ROOT / "lifecycle_scripts", dest)
    (dest / "__pycache__").mkdir(exist_ok=True)
    (dest / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"\0")
    return dest


def objects(bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix) :]: s3.get_object(Bucket=bucket, Key=k) for k in keys}


# --- moto: deploy -------------------------------------------------------------------------------------------------


def test_deploy_creates_then_is_a_no_op_then_updates(aws_env: str) -> None:
    cfg = config()
    assert stack.stack_outputs(cfg) is None
    log = Log()
    outputs = stack.deploy_stack(cfg, log=log)
    assert outputs[request.OUT_BUCKET].startswith("sagemaker-")
    assert {request.OUT_SUBNET, request.OUT_SECURITY_GROUP, request.OUT_ROLE} <= set(outputs)
    assert stack.stack_outputs(cfg) == outputs
    described = boto3.client("cloudformation").describe_stacks(StackName=cfg.stack_name)["Stacks"][0]
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags == {request.TAG_CLUSTER: cfg.cluster_name, request.TAG_MANAGED: "true", "project": "llama3-lora"}
    assert any(line.startswith("creating stack") for line in log)

    again = Log()
    assert stack.deploy_stack(cfg, log=again) == outputs
    assert f"stack {cfg.stack_name} unchanged" in again
    assert not any("updating" in line or "creating" in line for line in again)

    changed = config("network.backup_az_id=usw2-az2")
    updated = Log()
    new_outputs = stack.deploy_stack(changed, log=updated)
    assert any(line.startswith("updating stack") for line in updated), updated
    params = boto3.client("cloudformation").describe_stacks(StackName=cfg.stack_name)["Stacks"][0]["Parameters"]
    assert {"ParameterKey": "BackupSubnetAZ", "ParameterValue": "usw2-az2"} in params
    assert new_outputs[request.OUT_BUCKET] == outputs[request.OUT_BUCKET]
    # (moto does not re-evaluate conditional outputs on update, so BackupPrivateSubnet is not checked here)


def test_existing_network_needs_no_stack_and_no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_client(*_: object) -> None:
        raise AssertionError("no AWS call expected")

    monkeypatch.setattr(stack, "client", no_client)
    cfg = config(
        "network.mode=existing",
        "network.az_id=null",
        "network.subnet_ids=[subnet-0123456789abcdef0]",
        "network.security_group_id=sg-0123456789abcdef0",
        "network.execution_role_arn=arn:aws:iam::123456789012:role/r",
        "network.bucket=sagemaker-mine",
    )
    assert stack.deploy_stack(cfg, log=Log()) == {}


# --- moto: upload -------------------------------------------------------------------------------------------------


def test_upload_sends_scripts_with_sha256_once_and_then_only_a_changed_file(aws_env: str, scripts: Path) -> None:
    cfg = config(f"lifecycle.scripts_dir={scripts}")
    outputs = stack.deploy_stack(cfg, log=Log())
    result = upload.upload_lifecycle(cfg, outputs, log=Log())
    bucket, prefix = upload.split_s3_uri(result.s3_uri)
    assert result.s3_uri == request.lifecycle_s3_uri(cfg, outputs)
    stored = objects(bucket, prefix)
    expected = {"on_create.sh", "provision.py", "provision_config.py", "provision_runner.py", "provision_slurm.py",
                upload.CLUSTER_GROUPS_FILE}  # fmt: skip
    assert set(stored) == expected and sorted(result.uploaded) == sorted(expected)
    assert result.unchanged == []
    for name, obj in stored.items():
        body = obj["Body"].read()
        assert obj["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest(), name
        if name != upload.CLUSTER_GROUPS_FILE:
            assert body == (scripts / name).read_bytes()

    second = upload.upload_lifecycle(cfg, outputs, log=Log())
    assert second.uploaded == [] and sorted(second.unchanged) == sorted(expected)

    (scripts / "provision.py").write_text((scripts / "provision.py").read_text() + "\n# changed\n")
    third = upload.upload_lifecycle(cfg, outputs, log=Log())
    assert third.uploaded == ["provision.py"]
    assert objects(bucket, prefix)["provision.py"]["Body"].read().endswith(b"# changed\n")


def test_switching_api_style_removes_the_other_cluster_file(aws_env: str) -> None:
    """A stale provisioning_parameters.json would be read before cluster_groups.json on the nodes."""
    cfg = config("api=provisioning-parameters")
    outputs = stack.deploy_stack(cfg, log=Log())
    first = upload.upload_lifecycle(cfg, outputs, log=Log())
    assert request.PROVISIONING_PARAMETERS_FILE in first.uploaded
    bucket, prefix = upload.split_s3_uri(first.s3_uri)
    sent = json.loads(objects(bucket, prefix)[request.PROVISIONING_PARAMETERS_FILE]["Body"].read())
    assert sent == request.provisioning_parameters(cfg, outputs)

    second = upload.upload_lifecycle(config(), outputs, log=Log())
    assert second.uploaded == [upload.CLUSTER_GROUPS_FILE]
    assert second.removed == [request.PROVISIONING_PARAMETERS_FILE]
    assert request.PROVISIONING_PARAMETERS_FILE not in objects(bucket, prefix)


def _provision_config() -> Any:
    spec = importlib.util.spec_from_file_location(
        "provision_config", ROOT / "lifecycle_scripts" / "provision_config.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["provision_config"] = module
    spec.loader.exec_module(module)
    return module


def test_cluster_groups_file_is_read_by_the_lifecycle_scripts() -> None:
    cfg = config("fsx.mode=existing", "fsx.dns_name=fs-0123456789abcdef0.fsx.us-west-2.amazonaws.com",
                 "fsx.mount_name=abcdefgh", "fsx.id=fs-0123456789abcdef0")  # fmt: skip
    outputs = {request.OUT_SUBNET: "subnet-1", request.OUT_SECURITY_GROUP: "sg-1",
               request.OUT_ROLE: "arn:aws:iam::123456789012:role/r", request.OUT_BUCKET: "sagemaker-b"}  # fmt: skip
    name, content = upload.cluster_file(cfg, outputs)
    assert name == upload.CLUSTER_GROUPS_FILE
    spec = _provision_config().parse_cluster_config(json.loads(content), name)
    assert spec.controller_group == "controller-machine"
    assert spec.login_groups == ("login-group",)
    assert spec.workers == (("trn1-workers", "dev"),)
    assert spec.fsx is not None and "abcdefgh" in repr(spec.fsx)


# --- moto: delete -------------------------------------------------------------------------------------------------


def test_delete_empties_the_bucket_and_removes_the_stack(aws_env: str) -> None:
    cfg = config()
    outputs = stack.deploy_stack(cfg, log=Log())
    upload.upload_lifecycle(cfg, outputs, log=Log())
    bucket = outputs[request.OUT_BUCKET]
    log = Log()
    assert stack.delete_stack(cfg, log=log) is True
    assert stack.stack_outputs(cfg) is None
    s3 = boto3.client("s3")
    buckets = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert bucket not in buckets or s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert any(line.startswith(f"emptied bucket {bucket}") for line in log), log
    # moto leaves the route tables (and so the VPC): one line says so, no crash
    (last,) = [line for line in log if line.startswith(f"stack {cfg.stack_name} deleted")]
    assert "route table rtb-" in last, last
    assert stack.delete_stack(cfg, log=Log()) is False


def test_delete_refuses_a_stack_hyperjob_did_not_tag(aws_env: str) -> None:
    cfg = config()
    cfn = boto3.client("cloudformation")
    cfn.create_stack(
        StackName=cfg.stack_name,
        TemplateBody=stack.template_body(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in request.stack_parameters(cfg).items()],
        Tags=[{"Key": "owner", "Value": "someone-else"}],
    )
    with pytest.raises(AwsError, match=r"refusing to delete stack hyperjob-trn1-stack: it is not tagged "):
        stack.delete_stack(cfg, log=Log())
    assert cfn.describe_stacks(StackName=cfg.stack_name)["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
    other = config("cluster_name=another", "network.stack_name=hyperjob-trn1-stack")
    with pytest.raises(AwsError, match="hyperjob:cluster=another"):
        stack.delete_stack(other, log=Log())


# --- Stubber: what moto cannot do -------------------------------------------------------------------------------


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """A CloudFormation client with the real service model and no network; `stack.client` returns it."""
    cfn = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-west-2").client(
        "cloudformation", endpoint_url="http://127.0.0.1:9"
    )
    monkeypatch.setattr(stack, "client", lambda service, region: cfn)
    monkeypatch.setattr(stack, "WAIT", {"Delay": 1, "MaxAttempts": 1})
    with Stubber(cfn) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
STACK_ID = "arn:aws:cloudformation:us-west-2:123456789012:stack/hyperjob-trn1-stack/1"


def _stack(status: str) -> dict[str, Any]:
    return {"Stacks": [{"StackName": "hyperjob-trn1-stack", "StackId": STACK_ID, "CreationTime": NOW,
                        "StackStatus": status}]}  # fmt: skip


def _event(logical: str, kind: str, status: str, reason: str = "") -> dict[str, Any]:
    event = {"StackId": STACK_ID, "EventId": f"{logical}-{status}", "StackName": "hyperjob-trn1-stack",
             "LogicalResourceId": logical, "ResourceType": kind, "Timestamp": NOW,
             "ResourceStatus": status}  # fmt: skip
    return event | ({"ResourceStatusReason": reason} if reason else {})


def test_a_rollback_names_the_first_failed_resource(stubbed: Stubber) -> None:
    missing = {"Code": "ValidationError", "Message": "Stack with id hyperjob-trn1-stack does not exist"}
    stubbed.add_client_error("describe_stacks", "ValidationError", missing["Message"], 400)
    stubbed.add_response("create_stack", {"StackId": STACK_ID})
    stubbed.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"))  # the waiter: a failure state
    stubbed.add_response("describe_stacks", _stack("ROLLBACK_COMPLETE"))
    reason = 'Resource handler returned message: "The VPC quota was exceeded"'
    events = [  # newest first, as DescribeStackEvents lists them
        _event("hyperjob-trn1-stack", "AWS::CloudFormation::Stack", "ROLLBACK_COMPLETE"),
        _event("Subnet", "AWS::EC2::Subnet", "CREATE_FAILED", "Resource creation cancelled"),
        _event("VPC", "AWS::EC2::VPC", "CREATE_FAILED", reason),
        _event("hyperjob-trn1-stack", "AWS::CloudFormation::Stack", "CREATE_IN_PROGRESS", "User Initiated"),
        _event("Old", "AWS::EC2::VPC", "CREATE_FAILED", "an earlier attempt"),
    ]
    stubbed.add_response("describe_stack_events", {"StackEvents": events})
    with pytest.raises(AwsError) as caught:
        stack.deploy_stack(config(), log=Log())
    assert (
        str(caught.value)
        == f"stack hyperjob-trn1-stack rolled back: Resource VPC (AWS::EC2::VPC) CREATE_FAILED: {reason}"
    )
    assert "\n" not in str(caught.value)


def test_access_denied_on_create_stack_names_the_action(stubbed: Stubber) -> None:
    stubbed.add_client_error("describe_stacks", "ValidationError", "Stack with id hyperjob-trn1-stack does not exist")
    stubbed.add_client_error("create_stack", "AccessDenied", "User: arn:aws:iam::1:user/u is not authorized", 403)
    with pytest.raises(AwsError, match=r"^not allowed to call cloudformation:CreateStack \(AccessDenied\)"):
        stack.deploy_stack(config(), log=Log())


CHANGE_SET = {"ChangeSetName": "hyperjob-1", "StackName": "hyperjob-trn1-stack"}


def test_an_empty_change_set_on_aws_is_deleted_and_the_stack_is_unchanged(stubbed: Stubber) -> None:
    """AWS (unlike moto) creates the change set and ends it FAILED "didn't contain changes"."""
    stubbed.add_response("describe_stacks", _stack("UPDATE_COMPLETE"))
    stubbed.add_response("create_change_set", {"Id": "arn:cs", "StackId": STACK_ID})
    failed = CHANGE_SET | {"Status": "FAILED", "StatusReason": "The submitted information didn't contain changes."}
    stubbed.add_response("describe_change_set", failed)  # the waiter
    stubbed.add_response("describe_change_set", failed)
    stubbed.add_response("delete_change_set", {})
    stubbed.add_response("describe_stacks", _stack("UPDATE_COMPLETE"))
    log = Log()
    assert stack.deploy_stack(config(), log=log) == {}
    assert log == ["stack hyperjob-trn1-stack unchanged", "stack hyperjob-trn1-stack: UPDATE_COMPLETE"]


def test_a_failed_update_names_the_resource_and_a_refused_change_set_the_action(stubbed: Stubber) -> None:
    stubbed.add_response("describe_stacks", _stack("UPDATE_COMPLETE"))
    stubbed.add_response("create_change_set", {"Id": "arn:cs", "StackId": STACK_ID})
    ready = CHANGE_SET | {
        "Status": "CREATE_COMPLETE",
        "Changes": [
            {"Type": "Resource", "ResourceChange": {"LogicalResourceId": "BackupPrivateSubnet", "Action": "Add"}}
        ],
    }
    stubbed.add_response("describe_change_set", ready)
    stubbed.add_response("describe_change_set", ready)
    stubbed.add_response("execute_change_set", {})
    stubbed.add_response("describe_stacks", _stack("UPDATE_ROLLBACK_COMPLETE"))  # the waiter gives up
    stubbed.add_response("describe_stacks", _stack("UPDATE_ROLLBACK_COMPLETE"))
    events = [
        _event("BackupPrivateSubnet", "AWS::EC2::Subnet", "CREATE_FAILED", "no capacity in usw2-az2"),
        _event("hyperjob-trn1-stack", "AWS::CloudFormation::Stack", "UPDATE_IN_PROGRESS", "User Initiated"),
    ]
    stubbed.add_response("describe_stack_events", {"StackEvents": events})
    log = Log()
    with pytest.raises(
        AwsError,
        match=r"^stack hyperjob-trn1-stack rolled back: Resource BackupPrivateSubnet "
        r"\(AWS::EC2::Subnet\) CREATE_FAILED: no capacity in usw2-az2$",
    ):
        stack.deploy_stack(config(), log=log)
    assert log == ["updating stack hyperjob-trn1-stack: BackupPrivateSubnet"]

    stubbed.add_response("describe_stacks", _stack("UPDATE_COMPLETE"))
    stubbed.add_client_error("create_change_set", "AccessDenied", "no", 403)
    with pytest.raises(AwsError, match="not allowed to call cloudformation:CreateChangeSet"):
        stack.deploy_stack(config(), log=Log())
