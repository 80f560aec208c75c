"""~/.ssh/config blocks that reach HyperPod nodes through SSM: no public IP, no bastion, no open port 22.

Why: a HyperPod node sits in a private subnet; the only way in is an SSM session whose target names the cluster id,
the group and the instance id, which nobody should type by hand. Pure: the caller passes DescribeCluster's and
ListClusterNodes' answers, so the text is testable exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hyperjob.aws.cluster_config import ClusterConfig


def _cluster_id(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def _region(cfg: ClusterConfig, arn: str) -> str:
    """The config's region, else the ARN's (arn:aws:sagemaker:<region>:...): the session must go to that region."""
    if cfg.region:
        return cfg.region
    parts = arn.split(":")
    if len(parts) > 3 and parts[3]:
        return parts[3]
    raise ValueError(f"no region: the config has none and the cluster ARN {arn!r} names none")


def _ordered(cfg: ClusterConfig, nodes: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """Nodes by group in the config's order (groups only the cluster has go last), each group by instance id."""
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for node in nodes:
        by_group.setdefault(str(node["InstanceGroupName"]), []).append(node)
    order = [g.name for _, _, g in cfg.groups()]
    names = [n for n in order if n in by_group] + sorted(n for n in by_group if n not in order)
    return [(n, sorted(by_group[n], key=lambda node: str(node["InstanceId"]))) for n in names]


def ssh_config(cfg: ClusterConfig, description: Mapping[str, Any], nodes: Sequence[Mapping[str, Any]], *,
               user: str = "ubuntu") -> str:  # fmt: skip
    """A Host block per node (`<cluster>-<group>-<n>`, n from 1); the controller also answers `<cluster>-controller`."""
    arn = str(description["ClusterArn"])
    cid, region = _cluster_id(arn), _region(cfg, arn)
    name = cfg.cluster_name
    blocks = [f"# hyperjob cluster {name} ({arn}): needs the AWS CLI and its session-manager-plugin\n"]
    for group, members in _ordered(cfg, nodes):
        for n, node in enumerate(members, start=1):
            hosts = f"{name}-{group}-{n}"
            if group == cfg.controller.name and n == 1:
                hosts += f" {name}-controller"
            target = f"sagemaker-cluster:{cid}_{group}-{node['InstanceId']}"
            blocks.append(
                f"Host {hosts}\n"
                f"    User {user}\n"
                f"    ProxyCommand aws ssm start-session --target {target} --document-name AWS-StartSSHSession "
                f"--parameters portNumber=%p --region {region}\n"
            )
    return "\n".join(blocks)
