"""Checks before CreateCluster: the problems that otherwise surface 20 minutes later as a Failed cluster.

Why each check (the usual HyperPod failures): a public subnet or a security group without EFA's self-referencing
all-traffic rules breaks node-to-node traffic; an FSx in another AZ cannot be mounted; a bucket outside
`sagemaker-*` cannot be read by the instance role; an instance type not offered in the subnet's AZ, or above the
account's quota, never gets capacity. Each problem is one line; a check whose API does not answer is skipped with a
`note:` line. The EC2 offering is a proxy (SageMaker's own capacity is not queryable): it catches AZ mistakes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hyperjob.aws.cluster_config import ClusterConfig, consistency_problems
from hyperjob.aws.errors import explain
from hyperjob.aws.request import S3_PREFIX, Resources, lifecycle_s3_uri, resources
from hyperjob.aws.stack import client as _client  # the one place clients are made


def _call(client: Any, method: str, action: str, **kwargs: Any) -> dict[str, Any]:
    """One describe call; an AWS failure becomes AwsError naming `action`, so the user sees what was refused."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response: dict[str, Any] = getattr(client, method)(**kwargs)
    except (ClientError, BotoCoreError) as e:
        raise explain(e, action) from None
    return response


# --- pure judgements on describe answers -------------------------------------------------------------------------


def internet_gateway(route_tables: Iterable[Mapping[str, Any]]) -> str | None:
    """The internet gateway a subnet's route table sends traffic to (a public subnet), or None."""
    for table in route_tables:
        for route in table.get("Routes", []):
            gateway = str(route.get("GatewayId", ""))
            if gateway.startswith("igw-"):
                return gateway
    return None


def _self_all_traffic(permissions: Iterable[Mapping[str, Any]], group_id: str) -> bool:
    return any(
        p.get("IpProtocol") == "-1" and any(pair.get("GroupId") == group_id for pair in p.get("UserIdGroupPairs", []))
        for p in permissions
    )


def efa_rule_problems(group: Mapping[str, Any]) -> list[str]:
    """EFA needs all traffic to and from the group itself, both directions."""
    gid = str(group["GroupId"])
    lines = []
    for key, direction in (("IpPermissions", "ingress"), ("IpPermissionsEgress", "egress")):
        if not _self_all_traffic(group.get(key, []), gid):
            lines.append(f"security group {gid} lacks the EFA {direction} rule: all traffic (protocol -1) "
                         f"{'from' if direction == 'ingress' else 'to'} itself ({gid})")  # fmt: skip
    return lines


def _needed_counts(cfg: ClusterConfig) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, group in cfg.groups():
        counts[group.instance_type] = counts.get(group.instance_type, 0) + group.count
    return counts


# --- checks with AWS calls ---------------------------------------------------------------------------------------


def _subnet_azs(ec2: Any, res: Resources) -> dict[str, dict[str, Any]]:
    answer = _call(ec2, "describe_subnets", "ec2:DescribeSubnets", SubnetIds=list(res.subnet_ids))
    return {s["SubnetId"]: s for s in answer.get("Subnets", [])}


def _route_tables(ec2: Any, subnet: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The subnet's explicit route table, else its VPC's main one (what an unassociated subnet uses)."""
    action = "ec2:DescribeRouteTables"
    by_subnet = [{"Name": "association.subnet-id", "Values": [subnet["SubnetId"]]}]
    tables: list[dict[str, Any]] = _call(ec2, "describe_route_tables", action, Filters=by_subnet)["RouteTables"]
    if tables:
        return tables
    main = [{"Name": "vpc-id", "Values": [subnet["VpcId"]]}, {"Name": "association.main", "Values": ["true"]}]
    found: list[dict[str, Any]] = _call(ec2, "describe_route_tables", action, Filters=main)["RouteTables"]
    return found


def _subnet_problems(ec2: Any, subnets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for sid, subnet in subnets.items():
        gateway = internet_gateway(_route_tables(ec2, subnet))
        if gateway:
            lines.append(f"subnet {sid} is public (its route table sends traffic to internet gateway {gateway}): "
                         "HyperPod needs private subnets that reach the internet through a NAT gateway")  # fmt: skip
    return lines


def _security_group_problems(ec2: Any, group_id: str) -> list[str]:
    groups = _call(ec2, "describe_security_groups", "ec2:DescribeSecurityGroups", GroupIds=[group_id])
    return [line for g in groups.get("SecurityGroups", []) for line in efa_rule_problems(g)]


def _fsx_id(cfg: ClusterConfig) -> str | None:
    fsx = cfg.fsx
    if fsx.mode != "existing":
        return None  # the stack creates it in the primary subnet, or there is none
    return fsx.id or (fsx.dns_name.split(".", 1)[0] if fsx.dns_name else None)


def _fsx_problems(cfg: ClusterConfig, ec2: Any, subnet_azs: set[str]) -> list[str]:
    fsx_id = _fsx_id(cfg)
    if fsx_id is None:
        return []
    fsx = _client("fsx", cfg.region)
    systems = _call(fsx, "describe_file_systems", "fsx:DescribeFileSystems", FileSystemIds=[fsx_id])["FileSystems"]
    fsx_subnets = [s for fs in systems for s in fs.get("SubnetIds", [])]
    if not fsx_subnets:
        return [f"fsx.id: file system {fsx_id} has no subnet (is it deleted?)"]
    answer = _call(ec2, "describe_subnets", "ec2:DescribeSubnets", SubnetIds=fsx_subnets)
    fsx_azs = {s["AvailabilityZone"] for s in answer.get("Subnets", [])}
    if fsx_azs & subnet_azs:
        return []
    return [f"fsx.id: file system {fsx_id} is in {', '.join(sorted(fsx_azs))}, the cluster's subnets in "
            f"{', '.join(sorted(subnet_azs))}: Lustre must be in the cluster's AZ"]  # fmt: skip


def _offering_problems(ec2: Any, cfg: ClusterConfig, azs: Mapping[str, str]) -> list[str]:
    """SageMaker's ml.trn1.32xlarge is EC2's trn1.32xlarge: look the EC2 name up in each subnet's AZ."""
    ec2_types = sorted({t.removeprefix("ml.") for t in _needed_counts(cfg)})
    lines = []
    for az in sorted(azs):
        filters = [{"Name": "location", "Values": [az]}, {"Name": "instance-type", "Values": ec2_types}]
        pages = ec2.get_paginator("describe_instance_type_offerings").paginate(
            LocationType="availability-zone", Filters=filters
        )
        offered = {o["InstanceType"] for page in _pages(pages, "ec2:DescribeInstanceTypeOfferings")
                   for o in page.get("InstanceTypeOfferings", [])}  # fmt: skip
        where = f"{az} ({azs[az]})" if azs[az] else az
        lines += [f"ml.{t} is not offered in {where}: choose another AZ ID (network.az_id) or instance type"
                  for t in ec2_types if t not in offered]  # fmt: skip
    return lines


def _pages(pages: Any, action: str) -> list[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return list(pages)
    except (ClientError, BotoCoreError) as e:
        raise explain(e, action) from None


def quota_problems(cfg: ClusterConfig) -> list[str]:
    """'<type> for cluster usage' quotas against the instances the config asks for; a note when the API won't say."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client("service-quotas", cfg.region)
    try:
        pages = client.get_paginator("list_service_quotas").paginate(ServiceCode="sagemaker")
        quotas = {q["QuotaName"]: q.get("Value", 0) for page in pages for q in page.get("Quotas", [])}
    except (ClientError, BotoCoreError) as e:
        return [f"note: Service Quotas did not answer ({type(e).__name__}): cluster instance quotas not checked"]
    lines = []
    for itype, need in sorted(_needed_counts(cfg).items()):
        have = quotas.get(f"{itype} for cluster usage")
        if have is not None and have < need:
            lines.append(f"quota '{itype} for cluster usage' is {have:g}, the config needs {need}: "
                         "request an increase in Service Quotas (SageMaker)")  # fmt: skip
    return lines


def preflight(cfg: ClusterConfig, outputs: Mapping[str, str]) -> list[str]:
    """Every problem found, one line each (empty: nothing found). AWS refusals raise AwsError naming the action."""
    lines = [f"{key}: {message}" for key, message in consistency_problems(cfg)]
    try:
        res = resources(cfg, outputs)
        uri = lifecycle_s3_uri(cfg, outputs)
    except ValueError as e:  # StackOutputError too
        return [*lines, str(e)]
    if not uri.startswith(S3_PREFIX):
        lines.append(f"lifecycle scripts URI {uri} must start with {S3_PREFIX}: the cluster's instance policy "
                     "(AmazonSageMakerClusterInstanceRolePolicy) reads only such buckets")  # fmt: skip
    ec2 = _client("ec2", cfg.region)
    subnets = _subnet_azs(ec2, res)
    lines += [f"subnet {s} does not exist" for s in res.subnet_ids if s not in subnets]
    azs = {str(s["AvailabilityZone"]): str(s.get("AvailabilityZoneId", "")) for s in subnets.values()}
    lines += _subnet_problems(ec2, subnets)
    lines += _security_group_problems(ec2, res.security_group_id)
    lines += _fsx_problems(cfg, ec2, set(azs))
    lines += _offering_problems(ec2, cfg, azs)
    return lines + quota_problems(cfg)
