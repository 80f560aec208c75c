"""The cluster's life through boto3: create (idempotent), wait until InService, describe, list nodes, delete.

Why polling by hand: botocore has no waiters for HyperPod clusters, and a cluster takes 10-30 minutes, so the user
needs a progress line whenever a group's count moves, and a failure needs its FailureMessage and the CloudWatch log
group where the lifecycle scripts wrote why. Delete refuses any cluster hyperjob did not tag as its own.
boto3 is imported lazily: the light verbs never load it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hyperjob.aws.cluster_config import ClusterConfig
from hyperjob.aws.errors import AwsError, explain
from hyperjob.aws.request import TAG_CLUSTER, TAG_MANAGED, create_cluster_request, validate_request
from hyperjob.aws.stack import client as _client  # the one place clients are made

Log = Callable[[str], None]

FAILED_STATUSES = frozenset({"Failed", "RollingBack"})
FIRST_DELAY_S = 5.0
MAX_DELAY_S = 60.0
DELETE_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class CreateResult:
    created: bool
    arn: str


def cluster_id(arn: str) -> str:
    """The id HyperPod uses in SSM targets and log groups: the ARN's last path segment."""
    return arn.rsplit("/", 1)[-1]


def log_group(name: str, arn: str) -> str:
    """Where the lifecycle scripts' output goes: the first place to look when creation fails."""
    return f"/aws/sagemaker/Clusters/{name}/{cluster_id(arn)}"


def _is_not_found(error: Any) -> bool:
    """DescribeCluster says ResourceNotFound for a missing cluster (moto: ValidationException 'Could not find')."""
    info = getattr(error, "response", {}).get("Error", {})
    code, message = str(info.get("Code", "")), str(info.get("Message", "")).lower()
    if code in ("ResourceNotFound", "ResourceNotFoundException"):
        return True
    return code == "ValidationException" and any(s in message for s in ("not find", "not found", "does not exist"))


def _describe(client: Any, name: str) -> dict[str, Any] | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response: dict[str, Any] = client.describe_cluster(ClusterName=name)
    except ClientError as e:
        if _is_not_found(e):
            return None
        raise explain(e, "sagemaker:DescribeCluster") from None
    except BotoCoreError as e:
        raise explain(e, "sagemaker:DescribeCluster") from None
    response.pop("ResponseMetadata", None)
    return response


def describe(cfg: ClusterConfig) -> dict[str, Any] | None:
    """DescribeCluster's answer, or None when no cluster of that name exists."""
    return _describe(_client("sagemaker", cfg.region), cfg.cluster_name)


# --- create ------------------------------------------------------------------------------------------------------


def group_differences(cfg: ClusterConfig, description: Mapping[str, Any]) -> list[str]:
    """One line per way the running cluster's groups differ from the config (type, count, missing, extra).

    Pure: create does not change an existing cluster, so the user must know what the config would have changed.
    """
    have = {g.get("InstanceGroupName", ""): g for g in description.get("InstanceGroups", [])}
    lines = []
    for _, key, group in cfg.groups():
        found = have.pop(group.name, None)
        if found is None:
            lines.append(f"{key}: group {group.name!r} is in the config but not in the cluster")
            continue
        if found.get("InstanceType") != group.instance_type:
            lines.append(f"{key}: group {group.name!r} has instance type {found.get('InstanceType')}, "
                         f"the config says {group.instance_type}")  # fmt: skip
        target = found.get("TargetCount", found.get("CurrentCount"))
        if target is not None and target != group.count:
            lines.append(f"{key}: group {group.name!r} has {target} instances, the config says {group.count}")
    lines += [f"group {name!r} is in the cluster but not in the config" for name in have]
    return lines


def create_cluster(
    cfg: ClusterConfig, outputs: Mapping[str, str], scripts_s3_uri: str, *, log: Log = print
) -> CreateResult:
    """Create the cluster unless one of that name exists (then create nothing and say how it differs)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client("sagemaker", cfg.region)
    existing = _describe(client, cfg.cluster_name)
    if existing is not None:
        arn = str(existing.get("ClusterArn", ""))
        log(f"cluster {cfg.cluster_name} exists ({existing.get('ClusterStatus')}): nothing created")
        for line in group_differences(cfg, existing):
            log(f"  differs: {line}")
        return CreateResult(created=False, arn=arn)
    request = create_cluster_request(cfg, outputs, scripts_s3_uri)
    validate_request(request)
    try:
        response = client.create_cluster(**request)
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "sagemaker:CreateCluster") from None
    arn = str(response["ClusterArn"])
    log(f"cluster {cfg.cluster_name} creating: {arn}")
    return CreateResult(created=True, arn=arn)


# --- wait --------------------------------------------------------------------------------------------------------


def progress_line(description: Mapping[str, Any]) -> str:
    """`Creating: controller-machine 0/1, trn1-workers 1/4`: the status and each group's current/target count."""
    groups = ", ".join(
        f"{g.get('InstanceGroupName')} {g.get('CurrentCount', 0)}/{g.get('TargetCount', '?')}"
        for g in description.get("InstanceGroups", [])
    )
    status = description.get("ClusterStatus", "unknown")
    return f"{status}: {groups}" if groups else str(status)


def _failure(cfg: ClusterConfig, description: Mapping[str, Any]) -> AwsError:
    status = description.get("ClusterStatus")
    message = description.get("FailureMessage") or "no FailureMessage given"
    where = log_group(cfg.cluster_name, str(description.get("ClusterArn", "")))
    return AwsError(f"cluster {cfg.cluster_name} is {status}: {message} (lifecycle script logs: CloudWatch log "
                    f"group {where})")  # fmt: skip


def _wait(deadline: float, delay: float, sleep: Callable[[float], None], clock: Callable[[], float]) -> float | None:
    """Sleep before the next DescribeCluster (never past the deadline) and return the next, doubled, delay; None
    once the deadline has passed. The one backoff of both waits (InService, deleted)."""
    remaining = deadline - clock()
    if remaining <= 0:
        return None
    sleep(min(delay, remaining))
    return min(delay * 2, MAX_DELAY_S)


def wait_in_service(
    cfg: ClusterConfig,
    *,
    timeout_s: float = 3600,
    log: Log = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll DescribeCluster (5 s doubling to 60 s) until InService; Failed/RollingBack or the timeout raise AwsError."""
    client = _client("sagemaker", cfg.region)
    deadline = clock() + timeout_s
    delay, shown = FIRST_DELAY_S, ""
    while True:
        description = _describe(client, cfg.cluster_name)
        if description is None:
            raise AwsError(f"cluster {cfg.cluster_name} does not exist (was it deleted?)")
        line = progress_line(description)
        if line != shown:
            log(line)
            shown = line
        status = description.get("ClusterStatus")
        if status == "InService":
            return description
        if status in FAILED_STATUSES:
            raise _failure(cfg, description)
        next_delay = _wait(deadline, delay, sleep, clock)
        if next_delay is None:
            raise AwsError(f"cluster {cfg.cluster_name} not InService after {timeout_s:.0f} s; last seen: {line}")
        delay = next_delay


# --- nodes and delete --------------------------------------------------------------------------------------------


def list_nodes(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Every node (ListClusterNodes, all pages): group, instance id, status, hostname."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client("sagemaker", cfg.region)
    try:
        pages = client.get_paginator("list_cluster_nodes").paginate(ClusterName=cfg.cluster_name)
        return [node for page in pages for node in page.get("ClusterNodeSummaries", [])]
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "sagemaker:ListClusterNodes") from None


def _ownership_problem(cfg: ClusterConfig, tags: Mapping[str, str]) -> str | None:
    """Why hyperjob must not delete this cluster, or None when its tags say hyperjob made it for this config."""
    want = {TAG_CLUSTER: cfg.cluster_name, TAG_MANAGED: "true"}
    wrong = [f"{k}={tags.get(k, '(missing)')}" for k, v in want.items() if tags.get(k) != v]
    if not wrong:
        return None
    need = ", ".join(f"{k}={v}" for k, v in want.items())
    return (f"refusing to delete cluster {cfg.cluster_name}: hyperjob did not create it (tags {', '.join(wrong)}; "
            f"needs {need}); delete it in the console or with aws sagemaker delete-cluster")  # fmt: skip


def _tags(client: Any, arn: str) -> dict[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        pages = client.get_paginator("list_tags").paginate(ResourceArn=arn)
        return {t["Key"]: t["Value"] for page in pages for t in page.get("Tags", [])}
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "sagemaker:ListTags") from None


def delete_cluster(
    cfg: ClusterConfig,
    *,
    log: Log = print,
    wait: bool = True,
    timeout_s: float = DELETE_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Delete the cluster if hyperjob's tags say it is this config's; False when there was none to delete."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client("sagemaker", cfg.region)
    description = _describe(client, cfg.cluster_name)
    if description is None:
        log(f"no cluster {cfg.cluster_name}: nothing to delete")
        return False
    problem = _ownership_problem(cfg, _tags(client, str(description["ClusterArn"])))
    if problem:
        raise AwsError(problem)
    try:
        client.delete_cluster(ClusterName=cfg.cluster_name)
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "sagemaker:DeleteCluster") from None
    log(f"cluster {cfg.cluster_name} deleting")
    if wait:
        _wait_gone(client, cfg, timeout_s, sleep, clock)
        log(f"cluster {cfg.cluster_name} deleted")
    return True


def _wait_gone(
    client: Any, cfg: ClusterConfig, timeout_s: float, sleep: Callable[[float], None], clock: Callable[[], float]
) -> None:
    """Deletion is done only when DescribeCluster no longer finds the cluster: a Failed delete raises."""
    deadline, delay = clock() + timeout_s, FIRST_DELAY_S
    while (description := _describe(client, cfg.cluster_name)) is not None:
        status = description.get("ClusterStatus")
        if status == "Failed":
            raise _failure(cfg, description)
        next_delay = _wait(deadline, delay, sleep, clock)
        if next_delay is None:
            raise AwsError(f"cluster {cfg.cluster_name} still exists ({status}) after {timeout_s:.0f} s of deleting")
        delay = next_delay
