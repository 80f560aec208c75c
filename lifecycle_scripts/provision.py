#!/usr/bin/env python3
"""Provision one HyperPod Slurm node: FSx for Lustre at /fsx, shared homes there, then Slurm for its role.

Run by on_create.sh on every node as it is created. This node's role comes from matching its addresses against
resource_config.json's CustomerIpAddress values, then looking its group up in the cluster config (see
provision_config for the two styles). Exit codes: 0 done, 1 a step failed, 2 bad inputs; the last line of stderr
says why. `--dry-run` prints the steps as a shell script instead of running them (try it on a node first).

Standard library only, Python 3.8 syntax: it runs on the image's stock python3 before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from provision_config import (
    ClusterSpec,
    Fsx,
    Group,
    Instance,
    ProvisionError,
    ResourceConfig,
    check_group_names,
    controller_ips,
    find_local_node,
    lustre_source_at,
    parse_cluster_config,
    parse_ip_addr,
    parse_resource_config,
    spec_from_resource_config,
)
from provision_runner import CommandFailed, Runner
from provision_slurm import LOG_DIR, SLURM_USER, SPOOL_DIR, STATE_DIR, names_controller, render_slurm_conf

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESOURCE_CONFIG = "/opt/ml/config/resource_config.json"
# Beside the scripts: the user's provisioning_parameters.json, else the CreateCluster-style groups hyperjob uploads
# as cluster_groups.json (a name HyperPod itself never reads); then the copy HyperPod writes on the node.
CLUSTER_CONFIGS = (
    os.path.join(HERE, "provisioning_parameters.json"),
    os.path.join(HERE, "cluster_groups.json"),
    "/opt/ml/config/provisioning_parameters.json",
)
SLURM_CONF = "/opt/slurm/etc/slurm.conf"  # where the HyperPod image's Slurm reads it
SLURMD_DROP_IN = "/etc/systemd/system/slurmd.service.d/50-hyperjob-conf-server.conf"
FSTAB = "/etc/fstab"
LUSTRE_OPTIONS = "noatime,flock"


@dataclass(frozen=True)
class Node:
    """Everything the steps need to know, decided before any side effect."""

    resource: ResourceConfig
    spec: ClusterSpec
    group: Group
    instance: Instance
    role: str


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="provision.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--resource-config", default=os.environ.get("SAGEMAKER_RESOURCE_CONFIG_PATH") or DEFAULT_RESOURCE_CONFIG
    )
    config = parser.add_mutually_exclusive_group()
    config.add_argument("--cluster-config", help="provisioning_parameters.json or CreateCluster-style groups")
    config.add_argument(
        "--no-cluster-config", action="store_true", help="use only the SlurmConfig of resource_config.json's groups"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps instead of running them")
    parser.add_argument("--ip", action="append", default=[], help="this node's address (default: detected)")
    parser.add_argument("--mount-point", default="/fsx")
    parser.add_argument("--proc-mounts", default="/proc/mounts", help="where to see what is mounted")
    parser.add_argument("--slurm-conf", default=os.environ.get("SLURM_CONF") or SLURM_CONF)
    parser.add_argument("--slurm-conf-wait", type=float, default=60.0, help="seconds to wait for HyperPod's")
    parser.add_argument("--init", choices=("auto", "systemd", "direct"), default="auto", help="how daemons start")
    parser.add_argument("--attempts", type=int, default=6, help="tries of the FSx mount")
    parser.add_argument(
        "--slurmd-attempts", type=int, default=30, help="tries of slurmd's start: the controller may come up later"
    )
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds between tries")
    return parser.parse_args(argv)


def read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ProvisionError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{path}: cannot be read as JSON: {exc}") from None


def load_spec(resource: ResourceConfig, explicit: str | None, search: Sequence[str]) -> ClusterSpec:
    """The cluster config: the explicit file, else the first of `search` that exists, else resource_config's own
    SlurmConfig (CreateCluster style without a file)."""
    if explicit:
        return parse_cluster_config(read_json(explicit), os.path.basename(explicit))
    for path in search:
        if os.path.exists(path):
            return parse_cluster_config(read_json(path), os.path.basename(path))
    return spec_from_resource_config(resource, "resource_config.json", search)


def detect_ips() -> list[str]:
    """This node's IPv4 addresses: every interface's (`ip -o -4 addr show`) and the one that routes outward."""
    ips: list[str] = []
    try:
        shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], stdout=subprocess.PIPE, text=True, check=False)
        ips += parse_ip_addr(shown.stdout)
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.254.254.254", 1))  # UDP: picks the outward address without sending anything
        ips.append(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    return sorted(set(ips), key=ips.index)


def decide(args: argparse.Namespace) -> Node:
    """Parse, cross-check and locate this node: every input error surfaces here, before anything is changed."""
    resource = parse_resource_config(read_json(args.resource_config), os.path.basename(args.resource_config))
    search = () if args.no_cluster_config else CLUSTER_CONFIGS
    spec = load_spec(resource, args.cluster_config, search)
    check_group_names(spec, resource)
    group, instance = find_local_node(resource, args.ip or detect_ips())
    controller_ips(spec, resource)  # an empty controller group is an input error, whichever node this is
    return Node(resource, spec, group, instance, spec.role_of(group.name))


def read_text(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def mount_fsx(fsx: Fsx | None, mount_point: str, proc_mounts: str, runner: Runner, args: argparse.Namespace) -> bool:
    """Mount FSx for Lustre unless something (the service) already did. True when a Lustre is at `mount_point`."""
    mounted = lustre_source_at(proc_mounts, mount_point)
    if mounted:
        runner.note(f"FSx for Lustre already mounted at {mount_point} ({mounted}): not mounting again")
        return True
    if fsx is None:
        runner.note(f"no fsx_dns_name/fsx_mountname and nothing mounted at {mount_point}: no FSx, homes stay local")
        return False
    runner.note(f"mounting FSx for Lustre {fsx.source} at {mount_point}")
    runner.run(["mkdir", "-p", mount_point])
    runner.run(["modprobe", "lustre"])
    runner.run(
        ["mount", "-t", "lustre", "-o", LUSTRE_OPTIONS, fsx.source, mount_point],
        attempts=args.attempts,
        delay=args.retry_delay,
    )
    runner.ensure_line(FSTAB, f"{fsx.source} {mount_point} lustre defaults,{LUSTRE_OPTIONS},_netdev 0 0")
    return True


def shared_homes(users: Sequence[str], mount_point: str, runner: Runner) -> None:
    """Each user's home moves to <mount>/<user>, the same on every node. Safe when nodes race: the directory is
    created idempotently, and only files missing there are copied from the local home."""
    for user in users:
        home = f"{mount_point}/{user}"
        runner.note(f"home of {user} -> {home}")
        runner.run(["install", "-d", "-m", "0755", "-o", user, "-g", user, home])
        runner.run(["rsync", "-a", "--ignore-existing", f"/home/{user}/", f"{home}/"], allow_failure=True)
        runner.run(["usermod", "-d", home, user])


def uses_systemd(choice: str) -> bool:
    return choice == "systemd" or (choice == "auto" and os.path.isdir("/run/systemd/system"))


def existing_slurm_conf(path: str, ips: Sequence[str], wait: float, dry_run: bool) -> bool:
    """Whether HyperPod (or an earlier run) wrote a slurm.conf naming the controller; waits up to `wait` s."""
    deadline = time.monotonic() + (0.0 if dry_run else wait)
    while True:
        if names_controller(read_text(path), ips):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(5.0, wait))


def start_controller(node: Node, runner: Runner, args: argparse.Namespace) -> None:
    ips = controller_ips(node.spec, node.resource)
    if existing_slurm_conf(args.slurm_conf, ips, args.slurm_conf_wait, runner.dry_run):
        runner.note(f"{args.slurm_conf} already names the controller (written by HyperPod): kept")
    else:
        runner.note(f"writing {args.slurm_conf}: nodes and partitions from the groups")
        runner.write_file(args.slurm_conf, render_slurm_conf(node.spec, node.resource))
    runner.run(["mkdir", "-p", STATE_DIR, LOG_DIR])
    runner.run(["chown", f"{SLURM_USER}:{SLURM_USER}", STATE_DIR, LOG_DIR])
    runner.note("starting slurmctld")
    if uses_systemd(args.init):
        runner.run(["systemctl", "enable", "slurmctld"])
        runner.run(["systemctl", "restart", "slurmctld"])
    else:
        runner.run(["slurmctld", "-f", args.slurm_conf])


def start_slurmd(node: Node, runner: Runner, args: argparse.Namespace) -> None:
    """Configless slurmd on compute and login nodes. A login node is not in every slurm.conf HyperPod writes, so
    its slurmd may stop after fetching the config (which is all a login node needs): tolerated there."""
    server = ",".join(controller_ips(node.spec, node.resource))
    login = node.role == "login"
    runner.note(f"starting slurmd --conf-server {server}" + (" (login node: a failure is tolerated)" if login else ""))
    runner.run(["mkdir", "-p", SPOOL_DIR])
    retry = {"attempts": 1 if login else args.slurmd_attempts, "delay": args.retry_delay, "allow_failure": login}
    if uses_systemd(args.init):
        # The image's slurmd unit runs `slurmd ... $SLURMD_OPTIONS` (HyperPod's, Debian's and Slurm's own do).
        runner.write_file(SLURMD_DROP_IN, f'[Service]\nEnvironment="SLURMD_OPTIONS=--conf-server {server}"\n')
        runner.run(["systemctl", "daemon-reload"])
        runner.run(["systemctl", "enable", "slurmd"])
        runner.run(["systemctl", "restart", "slurmd"], **retry)
    else:
        runner.run(["slurmd", "--conf-server", server], **retry)


def describe(node: Node) -> str:
    partition = node.spec.partition_of(node.group.name)
    where = f", partition {partition}" if partition else ""
    who = node.instance.name or node.instance.instance_id or "instance"
    return (
        f"this node: {node.instance.ip} = {who} of group {node.group.name} ({node.group.instance_type or '?'}): "
        f"{node.role}{where}; cluster {node.resource.cluster_name}, roles from {node.spec.source}"
    )


def provision(node: Node, runner: Runner, args: argparse.Namespace) -> None:
    runner.note(describe(node))
    if mount_fsx(node.spec.fsx, args.mount_point, read_text(args.proc_mounts), runner, args):
        shared_homes(node.spec.home_users, args.mount_point, runner)
    if node.role == "controller":
        start_controller(node, runner, args)
    else:
        start_slurmd(node, runner, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(dry_run=args.dry_run)
    try:
        node = decide(args)
        provision(node, runner, args)
    except ProvisionError as exc:
        print(f"provision.py: error: {exc}", file=sys.stderr)
        return 2
    except (CommandFailed, OSError) as exc:
        print(f"provision.py: error: {exc}", file=sys.stderr)
        return 1
    runner.note(f"provisioned as {node.role}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
