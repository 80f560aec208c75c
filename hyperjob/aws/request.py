"""Pure builders: the cluster config plus the stack's outputs -> CreateCluster's request, provisioning_parameters.json
and the stack's parameters.

No AWS call here, so every field can be checked offline; `validate_request` checks a request against botocore's own
service model (imported lazily: nothing under hyperjob.aws loads boto3 at import time).

Two API styles (`api:` in the cluster config):
- `slurm-config` (botocore >= 1.42.49): Orchestrator.Slurm.SlurmConfigStrategy, each group's SlurmConfig (NodeType,
  one partition) and the FSx mount as InstanceStorageConfigs[].FsxLustreConfig: the service configures Slurm and
  mounts /fsx. The lifecycle scripts still run (LifeCycleConfig) for the rest of the node set-up.
- `provisioning-parameters`: the AWS samples' path: roles, partitions and FSx go to the lifecycle scripts in
  provisioning_parameters.json, whose group names must equal the request's InstanceGroupName values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hyperjob.aws.cluster_config import ClusterConfig, ControllerGroup, LoginGroup, WorkerGroup

# Output keys of hyperjob's CloudFormation template (cloudformation/hyperpod-network.yaml).
OUT_SUBNET = "PrimaryPrivateSubnet"
OUT_SECURITY_GROUP = "SecurityGroup"
OUT_ROLE = "AmazonSagemakerClusterExecutionRoleArn"
OUT_BUCKET = "AmazonS3BucketName"
OUT_FSX_ID = "FSxLustreFilesystemId"
OUT_FSX_DNS = "FSxLustreFilesystemDNSname"
OUT_FSX_MOUNT = "FSxLustreFilesystemMountname"

TAG_CLUSTER = "hyperjob:cluster"
TAG_MANAGED = "hyperjob:managed"
PROVISIONING_PARAMETERS_FILE = "provisioning_parameters.json"
S3_PREFIX = "s3://sagemaker-"  # AmazonSageMakerClusterInstanceRolePolicy reads only such buckets


class StackOutputError(ValueError):
    """The stack lacks an output the request needs: it was not made by hyperjob's template, or not finished."""


@dataclass(frozen=True)
class Fsx:
    dns_name: str
    mount_name: str
    mount_path: str


@dataclass(frozen=True)
class Resources:
    """What the cluster attaches to, wherever it came from (the stack's outputs or the config's existing ids)."""

    subnet_ids: tuple[str, ...]
    security_group_id: str
    execution_role_arn: str
    bucket: str
    fsx: Fsx | None


def _output(cfg: ClusterConfig, outputs: Mapping[str, str], key: str) -> str:
    value = outputs.get(key)
    if not value:
        have = ", ".join(sorted(outputs)) or "none"
        raise StackOutputError(f"stack {cfg.stack_name} has no output {key} (its outputs: {have}): was it created "
                               "by hyperjob's template, and did it finish?")  # fmt: skip
    return value


def resources(cfg: ClusterConfig, outputs: Mapping[str, str]) -> Resources:
    """Subnets, security group, role, bucket and FSx: from the stack's outputs (network.mode stack) or the config."""
    net, fsx = cfg.network, cfg.fsx
    if net.mode == "existing":
        if not (net.subnet_ids and net.security_group_id and net.execution_role_arn and net.bucket):
            raise ValueError("network.mode existing needs subnet_ids, security_group_id, execution_role_arn, bucket")
        found = (net.subnet_ids, net.security_group_id, net.execution_role_arn, net.bucket)
    else:
        found = (
            (_output(cfg, outputs, OUT_SUBNET),),
            _output(cfg, outputs, OUT_SECURITY_GROUP),
            _output(cfg, outputs, OUT_ROLE),
            _output(cfg, outputs, OUT_BUCKET),
        )
    mount: Fsx | None = None
    if fsx.mode == "existing":
        if not (fsx.dns_name and fsx.mount_name):
            raise ValueError("fsx.mode existing needs fsx.dns_name and fsx.mount_name")
        mount = Fsx(fsx.dns_name, fsx.mount_name, fsx.mount_path)
    elif fsx.mode == "create":
        mount = Fsx(_output(cfg, outputs, OUT_FSX_DNS), _output(cfg, outputs, OUT_FSX_MOUNT), fsx.mount_path)
    return Resources(*found, fsx=mount)


def lifecycle_s3_uri(cfg: ClusterConfig, outputs: Mapping[str, str]) -> str:
    """Where the lifecycle scripts go: one fixed prefix per cluster, so an unchanged script is found and skipped."""
    return f"s3://{resources(cfg, outputs).bucket}/hyperjob/{cfg.cluster_name}/lifecycle/"


def tags(cfg: ClusterConfig) -> list[dict[str, str]]:
    """The user's tags plus the two that let hyperjob delete only what it created for this cluster."""
    own = {TAG_CLUSTER: cfg.cluster_name, TAG_MANAGED: "true"}
    return [{"Key": k, "Value": v} for k, v in {**cfg.tags, **own}.items()]


def _instance_group(
    cfg: ClusterConfig,
    role: str,
    group: ControllerGroup | LoginGroup | WorkerGroup,
    res: Resources,
    scripts_s3_uri: str,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "InstanceGroupName": group.name,
        "InstanceType": group.instance_type,
        "InstanceCount": group.count,
        "LifeCycleConfig": {"SourceS3Uri": scripts_s3_uri, "OnCreate": cfg.lifecycle.on_create},
        "ExecutionRole": res.execution_role_arn,
        "ThreadsPerCore": group.threads_per_core,
    }
    storage: list[dict[str, Any]] = []
    if group.ebs_volume_gb is not None:
        storage.append({"EbsVolumeConfig": {"VolumeSizeInGB": group.ebs_volume_gb}})
    if cfg.api == "slurm-config" and res.fsx is not None:
        fsx = res.fsx
        storage.append({"FsxLustreConfig": {"DnsName": fsx.dns_name, "MountName": fsx.mount_name,
                                            "MountPath": fsx.mount_path}})  # fmt: skip
    if storage:
        spec["InstanceStorageConfigs"] = storage
    if isinstance(group, WorkerGroup) and group.deep_health_checks:
        spec["OnStartDeepHealthChecks"] = list(group.deep_health_checks)
    if cfg.api == "slurm-config":
        slurm: dict[str, Any] = {"NodeType": role}
        if isinstance(group, WorkerGroup):
            slurm["PartitionNames"] = [group.partition]
        spec["SlurmConfig"] = slurm
    return spec


def create_cluster_request(cfg: ClusterConfig, outputs: Mapping[str, str], scripts_s3_uri: str) -> dict[str, Any]:
    """CreateCluster's parameters (boto3 spelling). Raises ValueError for a scripts URI the nodes could not read."""
    if not scripts_s3_uri.startswith(S3_PREFIX):
        why = "the instance policy (AmazonSageMakerClusterInstanceRolePolicy) reads only those buckets"
        raise ValueError(f"lifecycle scripts URI {scripts_s3_uri!r} must start with {S3_PREFIX!r}: {why}")
    res = resources(cfg, outputs)
    request: dict[str, Any] = {
        "ClusterName": cfg.cluster_name,
        "InstanceGroups": [_instance_group(cfg, role, g, res, scripts_s3_uri) for role, _, g in cfg.groups()],
        "VpcConfig": {"SecurityGroupIds": [res.security_group_id], "Subnets": list(res.subnet_ids)},
        "Tags": tags(cfg),
        "NodeRecovery": cfg.node_recovery,
    }
    if cfg.api == "slurm-config":
        request["Orchestrator"] = {"Slurm": {"SlurmConfigStrategy": cfg.strategy}}
    return request


def provisioning_parameters(cfg: ClusterConfig, outputs: Mapping[str, str]) -> dict[str, Any]:
    """provisioning_parameters.json for the lifecycle scripts (api: provisioning-parameters).

    The group names are the request's InstanceGroupName values by construction (both come from `cfg.groups()`).
    AWS's migration guide for the slurm-config style says this file must not be in S3 there.
    """
    params: dict[str, Any] = {"version": "1.0.0", "workload_manager": "slurm", "controller_group": cfg.controller.name}
    if cfg.login is not None:
        params["login_group"] = cfg.login.name
    params["worker_groups"] = [{"instance_group_name": w.name, "partition_name": w.partition} for w in cfg.workers]
    fsx = resources(cfg, outputs).fsx
    if fsx is not None:
        params["fsx_dns_name"] = fsx.dns_name
        params["fsx_mountname"] = fsx.mount_name
    return params


def stack_parameters(cfg: ClusterConfig) -> dict[str, str]:
    """Parameters of hyperjob's CloudFormation template for network.mode stack (CloudFormation takes text)."""
    fsx, net = cfg.fsx, cfg.network
    params = {
        "ClusterName": cfg.cluster_name,
        "PrimarySubnetAZ": net.az_id or "",
        "BackupSubnetAZ": net.backup_az_id or "",
        "CreateFSx": "true" if fsx.mode == "create" else "false",
        "ExistingFSxId": fsx.id if fsx.mode == "existing" and fsx.id else "",
    }
    if fsx.mode == "create":
        params |= {"Capacity": str(fsx.capacity_gib), "PerUnitStorageThroughput": str(fsx.throughput),
                   "Compression": fsx.compression, "LustreVersion": fsx.lustre_version}  # fmt: skip
    return params


# --- checking a request against botocore's service model -------------------------------------------------------


def validate_request(request: Mapping[str, Any], operation: str = "CreateCluster") -> None:
    """Raise ValueError listing every field botocore's SageMaker model refuses.

    botocore's own validator catches unknown (misspelled) and missing fields, wrong types and minimums; enums,
    maximums and patterns it leaves to the service, so they are checked here too, from the same model.
    """
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("sagemaker").operation_model(operation).input_shape
    report = ParamValidator().validate(request, shape)
    problems = [report.generate_report()] if report.has_errors() else []
    problems += _constraint_problems(request, shape, operation)
    if problems:
        raise ValueError("\n".join(problems))


def _constraint_problems(value: Any, shape: Any, path: str) -> list[str]:
    """Enum, maximum and pattern problems of `value` against a botocore shape (types are ParamValidator's)."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, Mapping):
        return [p for k, v in value.items() if k in shape.members
                for p in _constraint_problems(v, shape.members[k], f"{path}.{k}")]  # fmt: skip
    if kind == "list" and isinstance(value, list):
        problems = [p for i, v in enumerate(value) for p in _constraint_problems(v, shape.member, f"{path}[{i}]")]
        if "max" in shape.metadata and len(value) > shape.metadata["max"]:
            problems.append(f"{path}: {len(value)} items, at most {shape.metadata['max']} allowed")
        return problems
    if kind == "string" and isinstance(value, str):
        return _string_problems(value, shape, path)
    if kind in ("integer", "long") and isinstance(value, int) and value > shape.metadata.get("max", value):
        return [f"{path}: {value} is above the maximum {shape.metadata['max']}"]
    return []


def _string_problems(value: str, shape: Any, path: str) -> list[str]:
    if shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of {', '.join(shape.enum)}"]
    if len(value) > shape.metadata.get("max", len(value)):
        return [f"{path}: {value!r} is longer than {shape.metadata['max']} characters"]
    pattern = shape.metadata.get("pattern")
    try:
        compiled = re.compile(pattern) if pattern else None
    except re.error:  # Java-only syntax (\p{L}...): left to the service
        compiled = None
    if compiled is not None and not compiled.fullmatch(value):
        return [f"{path}: {value!r} does not match the pattern {pattern}"]
    return []
