"""hyperjob's CloudFormation stack (network, bucket, role, optional FSx): deploy, read outputs, delete.

Why these shapes:
- a new stack is made with CreateStack, an existing one is changed through a change set: the change set says
  whether anything would change, so a second `cluster create` is a no-op instead of an error (and moto cannot read
  the outputs of a stack created by a change set);
- a failure is reported as the first resource that failed and its reason (DescribeStackEvents), not as a waiter
  timeout: that reason is what the user has to fix;
- delete refuses a stack hyperjob did not tag for this cluster, empties the bucket first (CloudFormation cannot
  delete a non-empty bucket) and checks the end state, since a failed delete can look like a success.

boto3 is imported inside `client` only: this module is imported by the cluster verbs alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from hyperjob.aws import request
from hyperjob.aws.cluster_config import ClusterConfig
from hyperjob.aws.errors import AwsError, explain
from hyperjob.resources import shipped_dir

Log = Callable[[str], None]

TEMPLATE_NAME = "hyperpod-network.yaml"
FAILED_STATES = frozenset(
    {"CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "UPDATE_ROLLBACK_COMPLETE",
     "UPDATE_ROLLBACK_FAILED", "UPDATE_FAILED", "DELETE_FAILED"}
)  # fmt: skip
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
WAIT = {"Delay": 5, "MaxAttempts": 720}  # up to an hour: an FSx file system alone takes 10-20 minutes
# EC2 resources the template tags; looked for after a delete, to report what is left behind.
_LEFTOVER_KINDS = (
    ("describe_route_tables", "RouteTables", "RouteTableId", "route table"),
    ("describe_subnets", "Subnets", "SubnetId", "subnet"),
    ("describe_security_groups", "SecurityGroups", "GroupId", "security group"),
    ("describe_internet_gateways", "InternetGateways", "InternetGatewayId", "internet gateway"),
    ("describe_vpcs", "Vpcs", "VpcId", "VPC"),
)


def client(service: str, region: str | None) -> Any:
    """The one place a boto3 client is made: boto3's own config (profile, AWS_ENDPOINT_URL), region from the config.

    `region` None leaves the choice to boto3 (AWS_REGION, AWS_DEFAULT_REGION, the profile).
    """
    import boto3

    return boto3.session.Session(region_name=region).client(service)


def call(action: str, method: Callable[..., Any], **kwargs: Any) -> Any:
    """`method(**kwargs)`, with any botocore failure turned into one AwsError line naming `action`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return method(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise explain(e, action) from e


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


# --- reading ----------------------------------------------------------------------------------------------------


def describe_stack(cfn: Any, name: str) -> dict[str, Any] | None:
    """DescribeStacks' stack, or None when there is none (CloudFormation answers ValidationError "does not exist")."""
    from botocore.exceptions import ClientError

    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except ClientError as e:
        if _error_code(e) == "ValidationError" and "does not exist" in str(e):
            return None
        raise explain(e, "cloudformation:DescribeStacks") from e
    return dict(stacks[0]) if stacks else None


def outputs_of(stack: Mapping[str, Any]) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def tags_of(stack: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in stack.get("Tags", [])}


def stack_outputs(cfg: ClusterConfig) -> dict[str, str] | None:
    """The stack's outputs, or None when the stack does not exist."""
    stack = describe_stack(client("cloudformation", cfg.region), cfg.stack_name)
    return None if stack is None else outputs_of(stack)


def _operation_events(cfn: Any, name: str) -> list[dict[str, Any]]:
    """The events of the stack's latest operation, oldest first (DescribeStackEvents lists newest first)."""
    from botocore.exceptions import BotoCoreError, ClientError

    newest_first: list[dict[str, Any]] = []
    try:  # a paginator sends its requests while it is iterated
        for page in cfn.get_paginator("describe_stack_events").paginate(StackName=name):
            for event in page.get("StackEvents", []):
                newest_first.append(event)
                started = event.get("ResourceStatusReason") == "User Initiated"
                if started and event.get("LogicalResourceId") == name:
                    return newest_first[::-1]
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "cloudformation:DescribeStackEvents") from e
    return newest_first[::-1]


def first_failure(events: list[dict[str, Any]], stack_name: str) -> str | None:
    """'Resource Y (AWS::...) CREATE_FAILED: reason' for the first resource that failed, oldest first.

    Resources cancelled because another one failed, and the stack's own event, say nothing the user can fix: they
    are used only when no other failure is there.
    """
    failed = [e for e in events if str(e.get("ResourceStatus", "")).endswith("_FAILED")]
    useful = [e for e in failed if e.get("LogicalResourceId") != stack_name
              and "cancelled" not in str(e.get("ResourceStatusReason", "")).lower()]  # fmt: skip
    for event in useful or failed:
        reason = str(event.get("ResourceStatusReason", "")).strip() or "no reason given"
        return (f"Resource {event.get('LogicalResourceId')} ({event.get('ResourceType')}) "
                f"{event.get('ResourceStatus')}: {reason}")  # fmt: skip
    return None


def failure_error(cfn: Any, name: str, status: str, status_reason: str = "") -> AwsError:
    """The one line for a stack that ended in `status`: its first failed resource and why."""
    verb = "rolled back" if "ROLLBACK" in status else f"failed ({status})"
    detail = first_failure(_operation_events(cfn, name), name) or status_reason or "no failed resource in its events"
    return AwsError(f"stack {name} {verb}: {detail}")


# --- deploying --------------------------------------------------------------------------------------------------


def template_body() -> str:
    return (shipped_dir("cloudformation") / TEMPLATE_NAME).read_text()


def _stack_args(cfg: ClusterConfig) -> dict[str, Any]:
    """What CreateStack and CreateChangeSet share: template, parameters, capabilities, tags."""
    params = request.stack_parameters(cfg)
    return {
        "StackName": cfg.stack_name,
        "TemplateBody": template_body(),
        "Parameters": [{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        "Capabilities": ["CAPABILITY_IAM"],
        "Tags": request.tags(cfg),
    }


def _wait(cfn: Any, waiter: str, name: str, **kwargs: Any) -> None:
    """Wait; a waiter that gives up because the stack failed becomes the stack's own failure line."""
    from botocore.exceptions import WaiterError

    try:
        cfn.get_waiter(waiter).wait(StackName=name, WaiterConfig=WAIT, **kwargs)
    except WaiterError as e:
        if kwargs:  # a change-set waiter: the caller reads the change set's own status
            return
        stack = describe_stack(cfn, name)
        if stack is None:
            raise AwsError(f"stack {name} vanished while waiting ({waiter}): {e}") from e
        raise failure_error(cfn, name, stack["StackStatus"], stack.get("StackStatusReason", "")) from e


def _create(cfn: Any, cfg: ClusterConfig, log: Log) -> None:
    log(f"creating stack {cfg.stack_name} (network, bucket, role{', FSx' if cfg.fsx.mode == 'create' else ''})")
    call("cloudformation:CreateStack", cfn.create_stack, **_stack_args(cfg))
    _wait(cfn, "stack_create_complete", cfg.stack_name)


def _update(cfn: Any, cfg: ClusterConfig, log: Log) -> None:
    """Through a change set: a no-op one is deleted ("unchanged"), any other is executed and waited for."""
    from botocore.exceptions import ClientError

    name, change_set = cfg.stack_name, f"hyperjob-{int(time.time())}"
    try:
        cfn.create_change_set(ChangeSetName=change_set, ChangeSetType="UPDATE", **_stack_args(cfg))
    except ClientError as e:
        if any(text in str(e) for text in NO_CHANGES):  # moto refuses a no-op change set at once
            log(f"stack {name} unchanged")
            return
        raise explain(e, "cloudformation:CreateChangeSet") from e
    _wait(cfn, "change_set_create_complete", name, ChangeSetName=change_set)
    described = call("cloudformation:DescribeChangeSet", cfn.describe_change_set, StackName=name,
                     ChangeSetName=change_set)  # fmt: skip
    if described.get("Status") == "FAILED":  # AWS ends a change set that changes nothing as FAILED
        call("cloudformation:DeleteChangeSet", cfn.delete_change_set, StackName=name, ChangeSetName=change_set)
        reason = str(described.get("StatusReason", "")) or "no reason given"
        if not any(text in reason for text in NO_CHANGES):
            raise AwsError(f"stack {name}: change set {change_set} failed: {reason}")
        log(f"stack {name} unchanged")
        return
    # Changes is empty when only parameters change (or on moto): executing still applies them.
    changed = sorted({c["ResourceChange"]["LogicalResourceId"] for c in described.get("Changes", [])
                      if "ResourceChange" in c})  # fmt: skip
    log(f"updating stack {name}: {', '.join(changed) or 'parameters'}")
    call("cloudformation:ExecuteChangeSet", cfn.execute_change_set, StackName=name, ChangeSetName=change_set)
    _wait(cfn, "stack_update_complete", name)


def deploy_stack(cfg: ClusterConfig, *, log: Log = print) -> dict[str, str]:
    """Create or update the stack and return its outputs; {} without any AWS call when network.mode is existing."""
    if cfg.network.mode != "stack":
        return {}
    cfn = client("cloudformation", cfg.region)
    name = cfg.stack_name
    stack = describe_stack(cfn, name)
    if stack is not None and stack["StackStatus"] in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED"):
        why = failure_error(cfn, name, stack["StackStatus"], stack.get("StackStatusReason", ""))
        raise AwsError(f"{why}; it cannot be updated: delete it (hyperjob cluster delete) and create it again")
    if stack is None:
        _create(cfn, cfg, log)
    else:
        _update(cfn, cfg, log)
    stack = describe_stack(cfn, name)
    if stack is None:
        raise AwsError(f"stack {name} is gone after deploying it: see its events in the CloudFormation console")
    if stack["StackStatus"] in FAILED_STATES:
        raise failure_error(cfn, name, stack["StackStatus"], stack.get("StackStatusReason", ""))
    log(f"stack {name}: {stack['StackStatus']}")
    return outputs_of(stack)


# --- deleting ---------------------------------------------------------------------------------------------------


def _check_owned(cfg: ClusterConfig, stack: Mapping[str, Any]) -> None:
    tags = tags_of(stack)
    if tags.get(request.TAG_CLUSTER) == cfg.cluster_name and tags.get(request.TAG_MANAGED) == "true":
        return
    shown = ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "none"
    raise AwsError(f"refusing to delete stack {cfg.stack_name}: it is not tagged {request.TAG_CLUSTER}="
                   f"{cfg.cluster_name} and {request.TAG_MANAGED}=true (its tags: {shown}), so hyperjob did not "
                   "create it for this cluster; delete it yourself if it is yours")  # fmt: skip


def empty_bucket(s3: Any, bucket: str, log: Log) -> int:
    """Delete every object version and delete marker: CloudFormation leaves a non-empty bucket behind."""
    from botocore.exceptions import ClientError

    removed = 0
    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]  # fmt: skip
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = keys[start : start + 1000]
                call("s3:DeleteObject", s3.delete_objects, Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                removed += len(batch)
    except ClientError as e:
        if _error_code(e) == "NoSuchBucket":
            return 0
        raise explain(e, "s3:ListBucketVersions") from e
    log(f"emptied bucket {bucket} ({removed} object{'s' if removed != 1 else ''})")
    return removed


def leftovers(ec2: Any, cfg: ClusterConfig) -> list[str]:
    """EC2 resources still tagged for this cluster by hyperjob (a failed or partial delete leaves them)."""
    filters = [{"Name": f"tag:{request.TAG_CLUSTER}", "Values": [cfg.cluster_name]},
               {"Name": f"tag:{request.TAG_MANAGED}", "Values": ["true"]}]  # fmt: skip
    found = []
    for method, key, id_key, label in _LEFTOVER_KINDS:
        action = "ec2:" + "".join(part.title() for part in method.split("_"))
        for item in call(action, getattr(ec2, method), Filters=filters)[key]:
            found.append(f"{label} {item[id_key]}")
    return found


def delete_stack(cfg: ClusterConfig, *, log: Log = print) -> bool:
    """Empty the stack's bucket, delete the stack and check it is gone; False when there was no stack."""
    from botocore.exceptions import ClientError

    cfn, name = client("cloudformation", cfg.region), cfg.stack_name
    stack = describe_stack(cfn, name)
    if stack is None:
        log(f"no stack {name}")
        return False
    _check_owned(cfg, stack)
    bucket = outputs_of(stack).get(request.OUT_BUCKET, "")
    if bucket.startswith("sagemaker-"):
        empty_bucket(client("s3", cfg.region), bucket, log)
    log(f"deleting stack {name}")
    refused: Exception | None = None
    try:
        cfn.delete_stack(StackName=name)
        _wait(cfn, "stack_delete_complete", name)
    except ClientError as e:
        refused = explain(e, "cloudformation:DeleteStack")
    except AwsError as e:
        refused = e
    end = describe_stack(cfn, name)
    if end is not None and end["StackStatus"] != "DELETE_COMPLETE":
        if refused is not None:
            raise refused
        raise failure_error(cfn, name, end["StackStatus"], end.get("StackStatusReason", ""))
    left = leftovers(client("ec2", cfg.region), cfg)
    said = f" (DeleteStack said: {refused})" if refused is not None else ""
    if left:
        log(f"stack {name} deleted, but left behind: {', '.join(left)} (delete them in the VPC console){said}")
    else:
        log(f"stack {name} deleted{said}")
    return True
