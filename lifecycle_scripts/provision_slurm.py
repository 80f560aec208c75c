"""slurm.conf for a HyperPod cluster, rendered from resource_config.json and the cluster config. Pure.

On HyperPod the service usually writes slurm.conf itself (from provisioning_parameters.json or the groups'
SlurmConfig); provision.py keeps such a file and renders this one only when none names the controller (a custom
image, a cluster built outside the service). The rendered cluster is configless: slurmctld serves the config and
every other node runs `slurmd --conf-server <controller>`, so no file has to be copied between nodes.

Node names follow EC2's default host names (`ip-10-1-2-3` for 10.1.2.3), which slurmd matches against its own
host name. Login nodes are listed without a partition: their slurmd registers (and keeps the config cache that
sbatch and squeue read there) but is never given jobs.
"""

from __future__ import annotations

import re
from typing import Sequence

from provision_config import ClusterSpec, ProvisionError, ResourceConfig

# vCPUs (threads per core 2) and memory in GiB, from the EC2 instance type tables. Only compute groups need an
# entry: the controller runs no slurmd, and login nodes get no jobs.
HARDWARE: dict[str, tuple[int, int]] = {
    "trn1.2xlarge": (8, 32),
    "trn1.32xlarge": (128, 512),
    "trn1n.32xlarge": (128, 512),
    "trn2.48xlarge": (192, 2048),
    "p4d.24xlarge": (96, 1152),
    "p4de.24xlarge": (96, 1152),
    "p5.48xlarge": (192, 2048),
    "p5e.48xlarge": (192, 2048),
    "p5en.48xlarge": (192, 2048),
    **{f"{family}.{size}": (cpus, 4 * cpus) for family in ("g5", "g6") for size, cpus in (
        ("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32), ("12xlarge", 48), ("16xlarge", 64),
        ("24xlarge", 96), ("48xlarge", 192))},
}  # fmt: skip
# Slurm drains a node whose RealMemory is above what the kernel reports, which is always below the nominal size.
MEMORY_FRACTION = 0.9
SLURM_USER = "slurm"
STATE_DIR = "/var/spool/slurmctld"
SPOOL_DIR = "/var/spool/slurmd"
LOG_DIR = "/var/log/slurm"


def node_name(ip: str) -> str:
    """EC2's default host name for an address: 10.1.2.3 -> ip-10-1-2-3."""
    return "ip-" + ip.replace(".", "-")


def _bare_type(instance_type: str) -> str:
    return instance_type[3:] if instance_type.startswith("ml.") else instance_type


def node_hardware(instance_type: str, threads_per_core: int | None) -> str:
    """`CPUs=N RealMemory=M` for a compute group. With one thread per core the OS sees half the vCPUs, and Slurm
    drains a node configured with more CPUs than it has, so an unknown threads-per-core counts as 1."""
    bare = _bare_type(instance_type)
    if bare not in HARDWARE:
        known = ", ".join("ml." + name for name in sorted(HARDWARE))
        raise ProvisionError(
            f"instance type {instance_type!r} of a compute group has no CPU and memory entry for slurm.conf "
            f"(known: {known}); let HyperPod write slurm.conf or add the type to provision_slurm.HARDWARE"
        )
    vcpus, gib = HARDWARE[bare]
    cpus = vcpus if threads_per_core == 2 else vcpus // 2
    return f"CPUs={cpus} RealMemory={int(gib * 1024 * MEMORY_FRACTION)}"


def _slurm_cluster_name(name: str) -> str:
    """Slurm lower-cases ClusterName; HyperPod names allow only letters, digits and hyphens already."""
    return name.lower() or "hyperpod"


def render_slurm_conf(spec: ClusterSpec, resource: ResourceConfig) -> str:
    """The whole slurm.conf: controller, nodes of every group with a role, one partition per compute partition."""
    controller = resource.group(spec.controller_group).instances[0]
    tpc = dict(spec.threads_per_core)
    lines = [
        "# Written by hyperjob's lifecycle scripts (provision.py) from resource_config.json and " + spec.source + ".",
        f"ClusterName={_slurm_cluster_name(resource.cluster_name)}",
        f"SlurmctldHost={node_name(controller.ip)}({controller.ip})",
        "SlurmctldParameters=enable_configless",
        f"SlurmUser={SLURM_USER}",
        "AuthType=auth/munge",
        f"StateSaveLocation={STATE_DIR}",
        f"SlurmdSpoolDir={SPOOL_DIR}",
        f"SlurmctldLogFile={LOG_DIR}/slurmctld.log",
        f"SlurmdLogFile={LOG_DIR}/slurmd.log",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        *_accounting(spec.accounting_host),
    ]
    for name, partition in spec.workers:
        group = resource.group(name)
        hardware = node_hardware(group.instance_type, tpc.get(name, group.threads_per_core))
        lines += [f"# {name} ({group.instance_type}): partition {partition}"]
        lines += [_node_line(inst.ip, hardware) for inst in group.instances]
    for name in spec.login_groups:
        lines += [f"# {name}: login nodes, in no partition"]
        lines += [_node_line(inst.ip, "") for inst in resource.group(name).instances]
    lines += _partitions(spec, resource)
    return "\n".join(lines) + "\n"


def _accounting(host: str | None) -> list[str]:
    if host is None:
        return ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
    return [
        "AccountingStorageType=accounting_storage/slurmdbd",
        f"AccountingStorageHost={host}",
        "JobAcctGatherType=jobacct_gather/linux",
    ]


def _node_line(ip: str, hardware: str) -> str:
    extra = f" {hardware}" if hardware else ""
    return f"NodeName={node_name(ip)} NodeAddr={ip} NodeHostname={node_name(ip)}{extra} State=UNKNOWN"


def _partitions(spec: ClusterSpec, resource: ResourceConfig) -> list[str]:
    """One PartitionName line per partition (groups sharing a partition are merged); the first is the default."""
    nodes: dict[str, list[str]] = {}
    for name, partition in spec.workers:
        nodes.setdefault(partition, []).extend(node_name(i.ip) for i in resource.group(name).instances)
    lines = []
    for index, (partition, names) in enumerate(nodes.items()):
        default = "YES" if index == 0 else "NO"
        members = f" Nodes={','.join(names)}" if names else ""  # a group of 0 instances: a partition without nodes
        lines.append(f"PartitionName={partition}{members} Default={default} MaxTime=INFINITE State=UP")
    return lines


def names_controller(slurm_conf: str, controller_ips: Sequence[str]) -> bool:
    """Whether an existing slurm.conf already points at this cluster's controller (HyperPod wrote it, or we did):
    a SlurmctldHost (or the older ControlMachine / ControlAddr) naming one of its addresses or host names."""
    wanted = set(controller_ips) | {node_name(ip) for ip in controller_ips}
    for line in slurm_conf.splitlines():
        key, _, value = line.split("#", 1)[0].partition("=")
        is_controller = key.strip().lower() in ("slurmctldhost", "controlmachine", "controladdr")
        if is_controller and wanted & set(re.split(r"[\s(),]+", value)):
            return True
    return False
