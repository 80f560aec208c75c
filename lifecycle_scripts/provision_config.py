"""Parsing of the two inputs a HyperPod node gets, and the decisions that follow from them alone.

Pure: no file, network or process access, so every rule here is unit-tested on sample inputs. Standard library
only and Python 3.8 syntax: this runs on the cluster image's stock python3, before anything is installed.

Inputs:
- resource_config.json, written by HyperPod on every node: `InstanceGroups[].Name`, `.InstanceType`,
  `.Instances[].{InstanceName, InstanceId, CustomerIpAddress}`, and `ClusterConfig.ClusterName`.
- the cluster config, in one of two styles:
  - provisioning_parameters (the LifeCycleConfig style of the AWS samples and of existing clusters):
    `controller_group`, optional `login_group`, `worker_groups[{instance_group_name, partition_name}]`;
  - slurm_config (CreateCluster since botocore 1.42.49): `InstanceGroups[{InstanceGroupName, SlurmConfig{NodeType:
    Controller|Login|Compute, PartitionNames: [at most one]}, ThreadsPerCore}]`, i.e. the request's own groups.
  Both take the optional keys `fsx_dns_name` + `fsx_mountname`, `shared_home_users` (default ["ubuntu"]) and
  `accounting_storage_host` (an existing slurmdbd). Without a cluster config file, `SlurmConfig` on
  resource_config.json's groups is used when the service put it there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

NODE_TYPES = {"Controller": "controller", "Login": "login", "Compute": "compute"}
STYLE_PARAMETERS = "provisioning_parameters"
STYLE_SLURM_CONFIG = "slurm_config"
DEFAULT_HOME_USERS = ("ubuntu",)
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_KIND_NAMES: dict[type, str] = {str: "a non-empty string", list: "a list", Mapping: "an object"}


class ProvisionError(Exception):
    """A problem in the inputs: one line naming the file, the key, the bad value and what is allowed."""


@dataclass(frozen=True)
class Instance:
    name: str
    instance_id: str
    ip: str


@dataclass(frozen=True)
class Group:
    """One instance group of resource_config.json; `slurm` is its SlurmConfig when the service wrote one."""

    name: str
    instance_type: str
    instances: tuple[Instance, ...]
    slurm: Mapping[str, Any] | None = None
    threads_per_core: int | None = None


@dataclass(frozen=True)
class ResourceConfig:
    cluster_name: str
    groups: tuple[Group, ...]

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def names(self) -> list[str]:
        return sorted(group.name for group in self.groups)


@dataclass(frozen=True)
class Fsx:
    dns_name: str
    mount_name: str

    @property
    def source(self) -> str:
        """The Lustre mount source, `<dns>@tcp:/<mountname>`."""
        return f"{self.dns_name}@tcp:/{self.mount_name}"


@dataclass(frozen=True)
class ClusterSpec:
    """The groups' roles, whichever style they came from; `source` names the file in messages."""

    source: str
    style: str
    controller_group: str
    login_groups: tuple[str, ...]
    workers: tuple[tuple[str, str], ...]  # (instance group name, partition name), in file order
    fsx: Fsx | None = None
    threads_per_core: tuple[tuple[str, int], ...] = ()
    home_users: tuple[str, ...] = DEFAULT_HOME_USERS
    accounting_host: str | None = None

    def role_of(self, group_name: str) -> str:
        if group_name == self.controller_group:
            return "controller"
        if group_name in self.login_groups:
            return "login"
        return "compute"

    def partition_of(self, group_name: str) -> str | None:
        return dict(self.workers).get(group_name)

    def named_groups(self) -> list[tuple[str, str]]:
        """(key that names it, group name) for every group of this spec, for consistency messages."""
        if self.style == STYLE_PARAMETERS:
            keys = ["controller_group", "login_group", "worker_groups[].instance_group_name"]
        else:
            keys = [f"InstanceGroups[].SlurmConfig.NodeType={t}" for t in ("Controller", "Login", "Compute")]
        names = [(keys[0], self.controller_group)]
        names += [(keys[1], name) for name in self.login_groups]
        names += [(keys[2], name) for name, _ in self.workers]
        return names


def _require(mapping: Any, key: str, where: str, kind: type = str) -> Any:
    """mapping[key], which must exist and be a `kind` (a non-empty one for str)."""
    if not isinstance(mapping, Mapping):
        raise ProvisionError(f"{where}: expected an object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ProvisionError(f"{where}: missing key {key}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is str and not value):
        raise ProvisionError(f"{where}.{key}: {value!r} is not {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


def _optional_str(mapping: Mapping[str, Any], key: str, where: str) -> str | None:
    value = mapping.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProvisionError(f"{where}.{key}: {value!r} is not a string")
    return value


def _no_duplicates(names: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ProvisionError(f"{where}: group {name!r} appears more than once")
        seen.add(name)


def _instance(raw: Any, where: str) -> Instance:
    ip = _require(raw, "CustomerIpAddress", where)
    if not _IPV4.match(ip):
        raise ProvisionError(f"{where}.CustomerIpAddress: {ip!r} is not an IPv4 address")
    return Instance(str(raw.get("InstanceName") or ""), str(raw.get("InstanceId") or ""), ip)


def parse_resource_config(data: Any, source: str = "resource_config.json") -> ResourceConfig:
    """resource_config.json -> ResourceConfig; a missing or mistyped key is named with its path."""
    groups_raw = _require(data, "InstanceGroups", source, list)
    groups = []
    for i, raw in enumerate(groups_raw):
        where = f"{source}: InstanceGroups[{i}]"
        name = _require(raw, "Name", where)
        instances = raw.get("Instances") or []
        if not isinstance(instances, list):
            raise ProvisionError(f"{where}.Instances: {instances!r} is not a list")
        slurm, tpc = raw.get("SlurmConfig"), raw.get("ThreadsPerCore")
        groups.append(
            Group(
                name=name,
                instance_type=str(raw.get("InstanceType") or ""),
                instances=tuple(_instance(inst, f"{where}.Instances[{j}]") for j, inst in enumerate(instances)),
                slurm=slurm if isinstance(slurm, Mapping) else None,
                threads_per_core=tpc if isinstance(tpc, int) else None,
            )
        )
    _no_duplicates([g.name for g in groups], f"{source}: InstanceGroups[].Name")
    cluster = data.get("ClusterConfig")
    name = cluster.get("ClusterName") if isinstance(cluster, Mapping) else None
    return ResourceConfig(cluster_name=str(name or "hyperpod"), groups=tuple(groups))


def _fsx(data: Mapping[str, Any], source: str) -> Fsx | None:
    dns = _optional_str(data, "fsx_dns_name", source)
    mount = _optional_str(data, "fsx_mountname", source)
    if dns is None and mount is None:
        return None
    if dns is None or mount is None:
        missing = "fsx_dns_name" if dns is None else "fsx_mountname"
        raise ProvisionError(f"{source}: {missing} is missing (fsx_dns_name and fsx_mountname go together)")
    return Fsx(dns, mount)


def _shared_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The optional keys both styles share."""
    users = data.get("shared_home_users", list(DEFAULT_HOME_USERS))
    if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
        raise ProvisionError(f"{source}.shared_home_users: {users!r} is not a list of user names")
    return {
        "fsx": _fsx(data, source),
        "home_users": tuple(users),
        "accounting_host": _optional_str(data, "accounting_storage_host", source),
    }


def parse_cluster_config(data: Any, source: str) -> ClusterSpec:
    """Either style of cluster config -> ClusterSpec. A file with both styles' keys is refused: which would win?"""
    if not isinstance(data, Mapping):
        raise ProvisionError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if "controller_group" in data and "InstanceGroups" in data:
        raise ProvisionError(
            f"{source}: has both controller_group (provisioning_parameters style) and InstanceGroups "
            "(CreateCluster SlurmConfig style); keep one"
        )
    if "controller_group" in data:
        return _parse_parameters(data, source)
    if "InstanceGroups" in data:
        groups = _require(data, "InstanceGroups", source, list)
        named = [(_require(g, "InstanceGroupName", f"{source}: InstanceGroups[{i}]"), g) for i, g in enumerate(groups)]
        return _parse_slurm_config(named, source, _shared_keys(data, source))
    raise ProvisionError(
        f"{source}: no roles: expected controller_group (provisioning_parameters style) or InstanceGroups with "
        "SlurmConfig (CreateCluster style)"
    )


def _parse_parameters(data: Mapping[str, Any], source: str) -> ClusterSpec:
    manager = data.get("workload_manager", "slurm")
    if manager != "slurm":
        raise ProvisionError(f"{source}.workload_manager: {manager!r} is not supported (allowed: slurm)")
    login = _optional_str(data, "login_group", source)
    workers = []
    for i, raw in enumerate(_require(data, "worker_groups", source, list)):
        where = f"{source}: worker_groups[{i}]"
        workers.append((_require(raw, "instance_group_name", where), _require(raw, "partition_name", where)))
    if not workers:
        raise ProvisionError(f"{source}.worker_groups: empty; name at least one compute group")
    spec = ClusterSpec(
        source=source,
        style=STYLE_PARAMETERS,
        controller_group=_require(data, "controller_group", source),
        login_groups=(login,) if login else (),
        workers=tuple(workers),
        **_shared_keys(data, source),
    )
    _no_duplicates([name for _, name in spec.named_groups()], source)
    return spec


def _parse_slurm_config(groups: Sequence[tuple[str, Any]], source: str, shared: dict[str, Any]) -> ClusterSpec:
    """(group name, group object carrying SlurmConfig) pairs -> ClusterSpec."""
    _no_duplicates([name for name, _ in groups], source)
    roles: dict[str, list[str]] = {"controller": [], "login": [], "compute": []}
    workers, tpc = [], []
    for name, raw in groups:
        where = f"{source}: group {name}.SlurmConfig"
        slurm = _require(raw, "SlurmConfig", f"{source}: group {name}", Mapping)
        node_type = _require(slurm, "NodeType", where)
        if node_type not in NODE_TYPES:
            allowed = ", ".join(NODE_TYPES)
            raise ProvisionError(f"{where}.NodeType: {node_type!r} is not allowed (allowed: {allowed})")
        partitions = slurm.get("PartitionNames") or []
        if not isinstance(partitions, list) or len(partitions) > 1:
            raise ProvisionError(f"{where}.PartitionNames: {partitions!r} must be a list of at most one name")
        roles[NODE_TYPES[node_type]].append(name)
        if NODE_TYPES[node_type] == "compute":
            workers.append((name, partitions[0] if partitions else name))
        if isinstance(raw.get("ThreadsPerCore"), int):
            tpc.append((name, raw["ThreadsPerCore"]))
    if len(roles["controller"]) != 1:
        found = ", ".join(roles["controller"]) or "none"
        raise ProvisionError(f"{source}: exactly one group needs SlurmConfig.NodeType=Controller (found: {found})")
    if not workers:
        raise ProvisionError(f"{source}: no group has SlurmConfig.NodeType=Compute")
    return ClusterSpec(
        source=source,
        style=STYLE_SLURM_CONFIG,
        controller_group=roles["controller"][0],
        login_groups=tuple(roles["login"]),
        workers=tuple(workers),
        threads_per_core=tuple(tpc),
        **shared,
    )


def spec_from_resource_config(resource: ResourceConfig, source: str, tried: Sequence[str]) -> ClusterSpec:
    """Roles from the SlurmConfig HyperPod may put on resource_config.json's groups, when no cluster config exists."""
    bare = [g.name for g in resource.groups if g.slurm is None]
    if bare:
        looked = f"{' nor '.join(tried)} exists" if tried else "--no-cluster-config"
        raise ProvisionError(
            f"no cluster config ({looked}) and {source} gives groups {', '.join(bare)} no SlurmConfig: "
            "ship provisioning_parameters.json beside the lifecycle scripts"
        )
    groups = [(g.name, {"SlurmConfig": g.slurm, "ThreadsPerCore": g.threads_per_core}) for g in resource.groups]
    return _parse_slurm_config(groups, source, {})


def check_group_names(spec: ClusterSpec, resource: ResourceConfig) -> None:
    """Every group the cluster config names is in resource_config.json, and every group there has a role."""
    known = resource.names()
    for key, name in spec.named_groups():
        if name not in known:
            raise ProvisionError(
                f"{spec.source}: {key} names instance group {name!r}, which resource_config.json does not have "
                f"(its groups: {', '.join(known)})"
            )
    named = sorted({name for _, name in spec.named_groups()})
    for name in known:
        if name not in named:
            raise ProvisionError(
                f"resource_config.json: instance group {name!r} has no role in {spec.source} "
                f"(groups with a role: {', '.join(named)})"
            )


def find_local_node(resource: ResourceConfig, local_ips: Sequence[str]) -> tuple[Group, Instance]:
    """The one instance whose CustomerIpAddress is one of this node's addresses."""
    mine = set(local_ips)
    matches = [(group, inst) for group in resource.groups for inst in group.instances if inst.ip in mine]
    if not matches:
        count = sum(len(g.instances) for g in resource.groups)
        raise ProvisionError(
            f"this node's addresses ({', '.join(local_ips) or 'none found'}) match no CustomerIpAddress of the "
            f"{count} instances in resource_config.json (groups: {', '.join(resource.names())})"
        )
    if len(matches) > 1:
        found = ", ".join(f"{inst.ip} in {group.name}" for group, inst in matches)
        raise ProvisionError(f"this node's addresses match more than one instance in resource_config.json: {found}")
    return matches[0]


def controller_ips(spec: ClusterSpec, resource: ResourceConfig) -> list[str]:
    """The controller group's addresses; a cluster whose controller group is empty cannot start Slurm."""
    ips = [inst.ip for inst in resource.group(spec.controller_group).instances]
    if not ips:
        raise ProvisionError(f"resource_config.json: controller group {spec.controller_group!r} has no instances")
    return ips


def parse_ip_addr(text: str) -> list[str]:
    """IPv4 addresses from `ip -o -4 addr show` output, loopback left out."""
    ips = []
    for line in text.splitlines():
        match = re.search(r"\sinet\s+(\d{1,3}(?:\.\d{1,3}){3})/", line)
        if match and not match.group(1).startswith("127."):
            ips.append(match.group(1))
    return ips


def lustre_source_at(proc_mounts: str, mount_point: str) -> str | None:
    """The source of the Lustre file system mounted at `mount_point` in a /proc/mounts text, or None."""
    for line in proc_mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == mount_point and fields[2] == "lustre":
            return fields[0]
    return None
