"""The HyperPod cluster config (hyperjob.aws.cluster_config) and the requests built from it (hyperjob.aws.request).

Bad configs fail naming the exact key; the built CreateCluster request is checked against botocore's real SageMaker
service model (its ParamValidator, the enums/maximums/patterns it leaves to the service, and a Stubber on a real
client), for both API styles; a misspelled field fails. Offline: no AWS, no server.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperjob.aws import request as rq
from hyperjob.aws.cluster_config import (
    INSTANCE_TYPES,
    ClusterConfig,
    DeepHealthCheck,
    check_lifecycle_scripts,
    load_cluster_config,
    natural_sorted,
    validate_cluster,
)
from hyperjob.config.load import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hyperpod-trn1.yaml"
TEMPLATE = ROOT / "cloudformation" / "hyperpod-network.yaml"
FSX_DNS = "fs-0123456789abcdef0.fsx.us-west-2.amazonaws.com"
OUTPUTS = {
    "VPC": "vpc-0123456789abcdef0",
    "PrimaryPrivateSubnet": "subnet-0123456789abcdef0",
    "SecurityGroup": "sg-0123456789abcdef0",
    "AmazonSagemakerClusterExecutionRoleArn": "arn:aws:iam::123456789012:role/hyperjob-exec",
    "AmazonS3BucketName": "sagemaker-hyperjob-trn1-abc123",
    "FSxLustreFilesystemId": "fs-0123456789abcdef0",
    "FSxLustreFilesystemDNSname": FSX_DNS,
    "FSxLustreFilesystemMountname": "abcdefgh",
}
EXISTING_NETWORK = {
    "mode": "existing",
    "subnet_ids": ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"],
    "security_group_id": "sg-0cccccccccccccccc",
    "execution_role_arn": "arn:aws:iam::123456789012:role/my-hyperpod-role",
    "bucket": "sagemaker-my-lifecycle",
}
EXISTING_FSX = {"mode": "existing", "id": "fs-0123456789abcdef0", "dns_name": FSX_DNS, "mount_name": "abcdefgh"}
DELETE = object()


def example_data() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


def patched(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy with `a__b__0__c=value` set (DELETE removes the key; the index after a list's last appends)."""
    out = copy.deepcopy(data)
    for path, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("__")]
        node: Any = out
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(value)
        else:
            node[last] = value
    return out


def problems_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_cluster(data, "c.yaml")
    assert info.value.source == "c.yaml"
    return dict(info.value.problems)


def example(*overrides: str) -> ClusterConfig:
    return load_cluster_config(EXAMPLE, overrides, check_inputs=False)


# --- the example ------------------------------------------------------------------------------------------------


def test_example_loads_as_documented() -> None:
    cfg = example()
    assert (cfg.region, cfg.cluster_name, cfg.api, cfg.strategy) == ("us-west-2", "hyperjob-trn1", "slurm-config",
                                                                     "Managed")  # fmt: skip
    assert [(role, g.name, g.instance_type, g.count) for role, _, g in cfg.groups()] == [
        ("Controller", "controller-machine", "ml.c5.xlarge", 1),
        ("Login", "login-group", "ml.m5.4xlarge", 1),
        ("Compute", "trn1-workers", "ml.trn1.32xlarge", 1),
    ]
    worker = cfg.workers[0]
    assert (worker.partition, worker.threads_per_core, worker.ebs_volume_gb) == ("dev", 1, 500)
    assert worker.deep_health_checks == ("InstanceStress", "InstanceConnectivity")
    assert (cfg.network.mode, cfg.network.az_id, cfg.stack_name) == ("stack", "usw2-az4", "hyperjob-trn1-stack")
    assert (cfg.fsx.mode, cfg.fsx.capacity_gib, cfg.fsx.throughput, cfg.fsx.mount_path) == ("create", 1200, 250, "/fsx")
    assert cfg.node_recovery == "Automatic" and cfg.tags == {"project": "llama3-lora"}


def test_overrides_apply_before_validation() -> None:
    cfg = example("cluster_name=other-cluster", "fsx.mode=none", "api=provisioning-parameters")
    assert cfg.cluster_name == "other-cluster" and cfg.stack_name == "other-cluster-stack"
    assert (cfg.fsx.mode, cfg.api) == ("none", "provisioning-parameters")
    with pytest.raises(ConfigError) as info:
        example("controller.count=2")
    assert info.value.lines() == [f"{EXAMPLE}: controller.count: 2 is not allowed: exactly one controller: the "
                                  "cluster runs one slurmctld (allowed: 1)"]  # fmt: skip


def test_lifecycle_scripts_dir_is_relative_to_the_config_and_checked(tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    config = tmp_path / "conf" / "cluster.yaml"
    config.parent.mkdir()
    config.write_text(EXAMPLE.read_text())
    with pytest.raises(ConfigError) as info:
        load_cluster_config(config, ["lifecycle.scripts_dir=../scripts"])
    assert info.value.lines() == [f"{config}: lifecycle.on_create: on_create.sh is not a file in {scripts}"]
    (scripts / "on_create.sh").write_text("#!/bin/bash\n")
    cfg = load_cluster_config(config, ["lifecycle.scripts_dir=../scripts"])
    assert cfg.scripts_dir() == scripts
    with pytest.raises(ConfigError) as info:
        load_cluster_config(config, ["lifecycle.scripts_dir=../nowhere"])
    assert info.value.problems == [("lifecycle.scripts_dir", f"{tmp_path / 'nowhere'} is not a directory")]


def test_check_lifecycle_scripts_names_the_entry_script(tmp_path: Path) -> None:
    (tmp_path / "start.sh").write_text("#!/bin/bash\n")
    cfg = example(f"lifecycle.scripts_dir={tmp_path}", "lifecycle.on_create=start.sh")
    check_lifecycle_scripts(cfg)  # present: no error
    with pytest.raises(ConfigError) as info:
        check_lifecycle_scripts(example(f"lifecycle.scripts_dir={tmp_path}"))
    assert info.value.problems == [("lifecycle.on_create", f"on_create.sh is not a file in {tmp_path}")]


# --- bad configs: the exact key and the reason ---------------------------------------------------------------------

_W = "workers__0__"
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("duplicate name across roles", {_W + "name": "controller-machine"}, "workers.0.name",
     "'controller-machine' is already the name of controller: instance group names must be unique"),
    ("duplicate worker name", {"workers__1": {"name": "trn1-workers", "instance_type": "ml.trn1.32xlarge",
                                              "count": 1, "partition": "big"}},
     "workers.1.name", "already the name of workers.0"),
    ("two controllers", {"controller__count": 2}, "controller.count", "exactly one controller"),
    ("no workers", {"workers": []}, "workers", "at least 1 item"),
    ("workers missing", {"workers": DELETE}, "workers", "required key is missing"),
    ("zero count", {_W + "count": 0}, "workers.0.count",
     "0 is not allowed: Input should be greater than or equal to 1"),
    ("count above the API maximum", {_W + "count": 7000}, "workers.0.count", "less than or equal to 6758"),
    ("login count", {"login__count": 0}, "login.count", "greater than or equal to 1"),
    ("partition with underscore", {_W + "partition": "my_part"}, "workers.0.partition",
     "'my_part' is not allowed: use letters, digits and hyphens"),
    ("partition missing", {_W + "partition": DELETE}, "workers.0.partition", "required key is missing"),
    ("unknown trn size", {_W + "instance_type": "ml.trn1.2xlarge"}, "workers.0.instance_type",
     "not a HyperPod instance type (trn family: ml.trn1.32xlarge, ml.trn1n.32xlarge, ml.trn2.3xlarge, "
     "ml.trn2.48xlarge)"),
    ("no ml. prefix", {"controller__instance_type": "c5.xlarge"}, "controller.instance_type",
     "write 'ml.c5.xlarge'"),
    ("threads per core", {_W + "threads_per_core": 3}, "workers.0.threads_per_core", "Input should be 1 or 2"),
    ("ebs size", {_W + "ebs_volume_gb": 0}, "workers.0.ebs_volume_gb", "greater than or equal to 1"),
    ("cluster name underscore", {"cluster_name": "my_cluster"}, "cluster_name", "use letters, digits and hyphens"),
    ("cluster name too long", {"cluster_name": "a" * 64}, "cluster_name", "at most 63 characters"),
    ("group name trailing hyphen", {"login__name": "login-"}, "login.name", "ending with a letter or digit"),
    ("unknown top-level key", {"clustername": "x"}, "clustername",
     "unknown key; allowed keys here: api, cluster_name, controller, fsx, lifecycle, login, network, node_recovery"),
    ("unknown worker key", {_W + "partitions": ["dev"]}, "workers.0.partitions",
     "unknown key; allowed keys here: count, deep_health_checks, ebs_volume_gb, instance_type, name, partition"),
    ("section given a value", {"controller": "ml.c5.xlarge"}, "controller",
     "a section, not a value: set its keys (name, instance_type, count"),
    ("api style", {"api": "legacy"}, "api", "Input should be 'slurm-config' or 'provisioning-parameters'"),
    ("strategy value", {"slurm_config_strategy": "Replace"}, "slurm_config_strategy", "'Managed', 'Overwrite' or"),
    ("node recovery", {"node_recovery": "Manual"}, "node_recovery", "Input should be 'Automatic' or 'None'"),
    ("health checks on a CPU group", {_W + "instance_type": "ml.c5.18xlarge"}, "workers.0.deep_health_checks",
     "deep health checks run on GPU and Trainium instances only, not ml.c5.18xlarge"),
    ("health check name", {_W + "deep_health_checks": ["GpuBurn"]}, "workers.0.deep_health_checks.0",
     "'GpuBurn' is not allowed: Input should be 'InstanceStress' or 'InstanceConnectivity'"),
    ("health check twice", {_W + "deep_health_checks": ["InstanceStress", "InstanceStress"]},
     "workers.0.deep_health_checks", "each check may be listed once"),
    ("stack without az", {"network__az_id": DELETE}, "network.az_id", "required with network.mode: stack"),
    ("az name, not id", {"network__az_id": "us-west-2a"}, "network.az_id", "not an AZ ID such as usw2-az4"),
    ("az of another region", {"network__az_id": "use1-az6"}, "network.az_id",
     "'use1-az6' is not in region us-west-2 (its AZ IDs start with usw2-)"),
    ("backup az equals primary", {"network__backup_az_id": "usw2-az4"}, "network.backup_az_id",
     "choose a second AZ ID"),
    ("existing id in stack mode", {"network__bucket": "sagemaker-x"}, "network.bucket",
     "only used with network.mode: existing"),
    ("existing mode needs every id", {"network": {"mode": "existing"}, "fsx": EXISTING_FSX},
     "network.execution_role_arn", "required with network.mode: existing"),
    ("bucket prefix", {"network": {**EXISTING_NETWORK, "bucket": "my-bucket"}, "fsx": EXISTING_FSX},
     "network.bucket", "'my-bucket' is not allowed: must be a bucket name starting with 'sagemaker-'"),
    ("subnet id", {"network": {**EXISTING_NETWORK, "subnet_ids": ["subnet-xyz"]}, "fsx": EXISTING_FSX},
     "network.subnet_ids.0", "not a subnet id"),
    ("role arn", {"network": {**EXISTING_NETWORK, "execution_role_arn": "my-role"}, "fsx": EXISTING_FSX},
     "network.execution_role_arn", "not an IAM role ARN"),
    ("fsx create without a stack", {"network": EXISTING_NETWORK}, "fsx.mode", "create needs network.mode: stack"),
    ("fsx existing needs every id", {"fsx": {"mode": "existing", "id": "fs-0123456789abcdef0"}},
     "fsx.mount_name", "required with fsx.mode: existing"),
    ("fsx dns of another file system", {"fsx": {**EXISTING_FSX, "id": "fs-0fffffffffffffff0"}}, "fsx.dns_name",
     "is not the DNS name of fsx.id fs-0fffffffffffffff0"),
    ("fsx id while creating one", {"fsx__id": "fs-0123456789abcdef0"}, "fsx.id", "only used with fsx.mode: existing"),
    ("fsx capacity step", {"fsx__capacity_gib": 3000}, "fsx.capacity_gib", "1200 or a multiple of 2400 GiB"),
    ("fsx throughput", {"fsx__throughput": 300}, "fsx.throughput", "Input should be 125, 250, 500 or 1000"),
    ("fsx mount name", {"fsx": {**EXISTING_FSX, "mount_name": "toolongname"}}, "fsx.mount_name",
     "not an FSx mount name"),
    ("entry script path", {"lifecycle__on_create": "sub/on_create.sh"}, "lifecycle.on_create",
     "must be a file name, no directory"),
    ("reserved tag", {"tags": {"hyperjob:cluster": "other"}}, "tags.hyperjob:cluster",
     "not starting with aws: or hyperjob:"),
    ("tag value number", {"tags": {"cost": 12}}, "tags.cost", "12 is a number, but this key takes text"),
    ("region", {"region": "oregon"}, "region", "not a region name, e.g. us-west-2"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "key", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_the_key(changes: dict[str, Any], key: str, message: str) -> None:
    problems = problems_of(patched(example_data(), **changes))
    assert key in problems, problems
    assert message in problems[key]


def test_every_problem_is_reported_at_once() -> None:
    data = patched(example_data(), network={"mode": "existing"}, fsx={"mode": "existing"})
    network = {"network.subnet_ids", "network.security_group_id", "network.bucket", "network.execution_role_arn"}
    assert set(problems_of(data)) == network | {"fsx.id", "fsx.dns_name", "fsx.mount_name"}


def test_settings_of_another_mode_are_ignored() -> None:
    """Only ids that would be ignored while new resources are created are errors; settings of another mode are not."""
    data = patched(example_data(), network={**EXISTING_NETWORK, "az_id": "usw2-az4"}, fsx={**EXISTING_FSX,
                   "capacity_gib": 2400}, api="provisioning-parameters", slurm_config_strategy="Merge")  # fmt: skip
    cfg = validate_cluster(data)
    assert (cfg.network.mode, cfg.fsx.mode, cfg.fsx.capacity_gib) == ("existing", "existing", 2400)
    assert "Orchestrator" not in build(cfg, {})


def test_instance_types_are_listed_in_natural_order() -> None:
    problems = problems_of(patched(example_data(), controller__instance_type="ml.z9.large"))
    listed = problems["controller.instance_type"].split("(allowed: ", 1)[1].rstrip(")").split(", ")
    assert set(listed) == INSTANCE_TYPES
    assert listed.index("ml.c5.2xlarge") < listed.index("ml.c5.12xlarge") < listed.index("ml.c5n.large")
    assert listed.index("ml.trn1.32xlarge") < listed.index("ml.trn1n.32xlarge") < listed.index("ml.trn2.3xlarge")
    assert natural_sorted(["ml.g5.48xlarge", "ml.g5.4xlarge", "ml.g5.xlarge"]) == [
        "ml.g5.xlarge", "ml.g5.4xlarge", "ml.g5.48xlarge"]  # fmt: skip


# --- the config's vocabulary agrees with botocore's service model ---------------------------------------------------


def sagemaker_shape(name: str) -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker").shape_for(name)


def test_config_vocabulary_is_in_the_service_model() -> None:
    assert set(sagemaker_shape("ClusterInstanceType").enum) >= INSTANCE_TYPES
    assert "ml.trn1.32xlarge" in INSTANCE_TYPES and "ml.c5.xlarge" in INSTANCE_TYPES
    assert set(DeepHealthCheck.__args__) <= set(sagemaker_shape("DeepHealthCheckType").enum)
    strategies = ClusterConfig.model_fields["slurm_config_strategy"].annotation.__args__[0].__args__  # type: ignore[union-attr]
    assert set(strategies) == set(sagemaker_shape("ClusterSlurmConfigStrategy").enum)
    assert set(sagemaker_shape("ClusterNodeRecovery").enum) == {"Automatic", "None"}
    assert sagemaker_shape("ClusterName").metadata["pattern"] == "[a-zA-Z0-9](-*[a-zA-Z0-9])*"
    assert sagemaker_shape("ClusterPartitionName").metadata["pattern"] == "[a-zA-Z0-9](-*[a-zA-Z0-9])*"


def test_the_newer_create_cluster_fields_exist_in_this_botocore() -> None:
    """What the slurm-config style relies on (botocore >= 1.42.49 / 1.42.88), checked rather than assumed."""
    request = sagemaker_shape("CreateClusterRequest")
    group = sagemaker_shape("ClusterInstanceGroupSpecification")
    assert {"Orchestrator", "NodeRecovery", "VpcConfig", "Tags"} <= set(request.members)
    assert set(request.required_members) == {"ClusterName"}
    assert "Slurm" in request.members["Orchestrator"].members
    assert set(group.members["SlurmConfig"].members["NodeType"].enum) == {"Controller", "Login", "Compute"}
    assert group.members["SlurmConfig"].members["PartitionNames"].metadata["max"] == 1
    assert "LifeCycleConfig" not in group.required_members  # optional since 1.42.88
    assert "FsxLustreConfig" in group.members["InstanceStorageConfigs"].member.members


# --- the CreateCluster request -------------------------------------------------------------------------------------


def build(cfg: ClusterConfig, outputs: dict[str, str] | None = None) -> dict[str, Any]:
    outputs = OUTPUTS if outputs is None else outputs
    return rq.create_cluster_request(cfg, outputs, rq.lifecycle_s3_uri(cfg, outputs))


STYLES = {
    "slurm-config": (),
    "provisioning-parameters": ("api=provisioning-parameters",),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_request_passes_the_service_model(style: str) -> None:
    request = build(example(*STYLES[style]))
    rq.validate_request(request)  # botocore's ParamValidator plus enums, maximums and patterns
    assert request["ClusterName"] == "hyperjob-trn1" and request["NodeRecovery"] == "Automatic"
    assert request["VpcConfig"] == {"SecurityGroupIds": ["sg-0123456789abcdef0"],
                                    "Subnets": ["subnet-0123456789abcdef0"]}  # fmt: skip
    uri = "s3://sagemaker-hyperjob-trn1-abc123/hyperjob/hyperjob-trn1/lifecycle/"
    for group in request["InstanceGroups"]:
        assert group["LifeCycleConfig"] == {"SourceS3Uri": uri, "OnCreate": "on_create.sh"}
        assert group["ExecutionRole"] == OUTPUTS["AmazonSagemakerClusterExecutionRoleArn"]
        assert group["ThreadsPerCore"] == 1  # always sent: moto answers 500 without it
    assert {"Key": "hyperjob:cluster", "Value": "hyperjob-trn1"} in request["Tags"]
    assert {"Key": "hyperjob:managed", "Value": "true"} in request["Tags"]
    assert {"Key": "project", "Value": "llama3-lora"} in request["Tags"]


def test_slurm_config_style_puts_roles_partitions_and_fsx_in_the_request() -> None:
    request = build(example())
    assert request["Orchestrator"] == {"Slurm": {"SlurmConfigStrategy": "Managed"}}
    controller, login, worker = request["InstanceGroups"]
    assert controller["SlurmConfig"] == {"NodeType": "Controller"}
    assert login["SlurmConfig"] == {"NodeType": "Login"}
    assert worker["SlurmConfig"] == {"NodeType": "Compute", "PartitionNames": ["dev"]}
    fsx = {"FsxLustreConfig": {"DnsName": FSX_DNS, "MountName": "abcdefgh", "MountPath": "/fsx"}}
    assert worker["InstanceStorageConfigs"] == [{"EbsVolumeConfig": {"VolumeSizeInGB": 500}}, fsx]
    assert login["InstanceStorageConfigs"] == [fsx]
    assert worker["OnStartDeepHealthChecks"] == ["InstanceStress", "InstanceConnectivity"]
    assert "OnStartDeepHealthChecks" not in controller


def test_provisioning_parameters_style_leaves_slurm_to_the_scripts() -> None:
    request = build(example("api=provisioning-parameters"))
    assert "Orchestrator" not in request
    for group in request["InstanceGroups"]:
        assert "SlurmConfig" not in group
        assert all("FsxLustreConfig" not in s for s in group.get("InstanceStorageConfigs", []))


def test_provisioning_parameters_names_equal_the_request_groups() -> None:
    cfg = example("api=provisioning-parameters")
    params = rq.provisioning_parameters(cfg, OUTPUTS)
    names = [g["InstanceGroupName"] for g in build(cfg)["InstanceGroups"]]
    assert [params["controller_group"], params["login_group"]] + [
        w["instance_group_name"] for w in params["worker_groups"]] == names  # fmt: skip
    assert params == {
        "version": "1.0.0",
        "workload_manager": "slurm",
        "controller_group": "controller-machine",
        "login_group": "login-group",
        "worker_groups": [{"instance_group_name": "trn1-workers", "partition_name": "dev"}],
        "fsx_dns_name": FSX_DNS,
        "fsx_mountname": "abcdefgh",
    }


def test_two_worker_groups_and_no_login_or_fsx() -> None:
    data = patched(example_data(), login=DELETE, fsx={"mode": "none"})
    data["workers"].append({"name": "big", "instance_type": "ml.trn1n.32xlarge", "count": 4, "partition": "big"})
    cfg = validate_cluster(data)
    request = build(cfg, {k: v for k, v in OUTPUTS.items() if not k.startswith("FSx")})
    rq.validate_request(request)
    assert [(g["InstanceGroupName"], g["SlurmConfig"]) for g in request["InstanceGroups"]] == [
        ("controller-machine", {"NodeType": "Controller"}),
        ("trn1-workers", {"NodeType": "Compute", "PartitionNames": ["dev"]}),
        ("big", {"NodeType": "Compute", "PartitionNames": ["big"]}),
    ]
    assert "InstanceStorageConfigs" not in request["InstanceGroups"][2]  # no EBS, no FSx
    params = rq.provisioning_parameters(cfg, OUTPUTS)
    assert "login_group" not in params and "fsx_dns_name" not in params
    assert [w["partition_name"] for w in params["worker_groups"]] == ["dev", "big"]


def test_existing_ids_need_no_stack_outputs() -> None:
    cfg = validate_cluster(patched(example_data(), network=EXISTING_NETWORK, fsx=EXISTING_FSX))
    request = build(cfg, {})
    rq.validate_request(request)
    assert request["VpcConfig"] == {"SecurityGroupIds": ["sg-0cccccccccccccccc"],
                                    "Subnets": ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]}  # fmt: skip
    assert request["InstanceGroups"][0]["LifeCycleConfig"]["SourceS3Uri"].startswith("s3://sagemaker-my-lifecycle/")
    assert request["InstanceGroups"][0]["ExecutionRole"] == EXISTING_NETWORK["execution_role_arn"]
    assert rq.provisioning_parameters(cfg, {})["fsx_mountname"] == "abcdefgh"


def test_a_missing_stack_output_is_named() -> None:
    outputs = {k: v for k, v in OUTPUTS.items() if k != "SecurityGroup"}
    with pytest.raises(rq.StackOutputError, match=r"stack hyperjob-trn1-stack has no output SecurityGroup "
                                                  r"\(its outputs: AmazonS3BucketName, "):  # fmt: skip
        build(example(), outputs)
    outputs = {k: v for k, v in OUTPUTS.items() if k != "FSxLustreFilesystemMountname"}
    with pytest.raises(rq.StackOutputError, match="no output FSxLustreFilesystemMountname"):
        rq.provisioning_parameters(example(), outputs)


def test_scripts_uri_must_be_a_sagemaker_bucket() -> None:
    with pytest.raises(ValueError, match=r"'s3://my-bucket/x/' must start with 's3://sagemaker-'"):
        rq.create_cluster_request(example(), OUTPUTS, "s3://my-bucket/x/")


# --- a wrong request fails against the service model ---------------------------------------------------------------


def test_misspelled_fields_fail_validation() -> None:
    request = build(example())
    top = {("InstanceGroup" if k == "InstanceGroups" else k): v for k, v in request.items()}
    with pytest.raises(ValueError, match='Unknown parameter in input: "InstanceGroup"'):
        rq.validate_request(top)
    nested = copy.deepcopy(request)
    nested["InstanceGroups"][2]["SlurmConfig"]["PartitionName"] = nested["InstanceGroups"][2]["SlurmConfig"].pop(
        "PartitionNames")  # fmt: skip
    with pytest.raises(ValueError, match=r'Unknown parameter in InstanceGroups\[2\]\.SlurmConfig: "PartitionName"'):
        rq.validate_request(nested)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("InstanceGroups", 2, "SlurmConfig", "NodeType"), "Worker", "'Worker' is not one of Controller, Login, "),
        (("InstanceGroups", 0, "ThreadsPerCore"), 4, "InstanceGroups[0].ThreadsPerCore: 4 is above the maximum 2"),
        (("ClusterName",), "bad_name", "CreateCluster.ClusterName: 'bad_name' does not match the pattern"),
        (("InstanceGroups", 2, "SlurmConfig", "PartitionNames"), ["a", "b"], "2 items, at most 1 allowed"),
        (("InstanceGroups", 1, "InstanceCount"), "1", "Invalid type for parameter InstanceGroups[1].InstanceCount"),
    ],
)
def test_values_the_service_would_refuse_fail_validation(path: tuple[Any, ...], value: Any, message: str) -> None:
    request = build(example())
    node: Any = request
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ValueError) as info:
        rq.validate_request(request)
    assert message in str(info.value)


def test_a_real_client_sends_the_request_through_a_stubber() -> None:
    """boto3's own client-side checks (the same model) accept the request; a misspelling raises before sending."""
    import boto3
    from botocore.exceptions import ParamValidationError
    from botocore.stub import Stubber

    client = boto3.client("sagemaker", region_name="us-west-2", aws_access_key_id="testing",
                          aws_secret_access_key="testing")  # fmt: skip
    arn = "arn:aws:sagemaker:us-west-2:123456789012:cluster/abcdef123456"
    for style in STYLES.values():
        request = build(example(*style))
        with Stubber(client) as stub:
            stub.add_response("create_cluster", {"ClusterArn": arn}, expected_params=request)
            assert client.create_cluster(**request)["ClusterArn"] == arn
            stub.assert_no_pending_responses()
    bad = build(example())
    bad["InstanceGroups"][0]["LifecycleConfig"] = bad["InstanceGroups"][0].pop("LifeCycleConfig")
    with Stubber(client) as stub, pytest.raises(ParamValidationError, match=r'InstanceGroups\[0\]: "LifecycleConfig"'):
        stub.add_response("create_cluster", {"ClusterArn": arn})  # would answer, but the request never leaves
        client.create_cluster(**bad)


# --- the stack's parameters agree with hyperjob's template ---------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """Reads a CloudFormation template's YAML, keeping intrinsic functions (!Ref, !GetAtt...) as plain values."""


_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def template() -> dict[str, Any]:
    data = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)  # a SafeLoader subclass: plain data only
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    "changes",
    [{}, {"fsx": EXISTING_FSX}, {"fsx": {"mode": "none"}}, {"network__backup_az_id": "usw2-az2"}],
    ids=["fsx-create", "fsx-existing", "fsx-none", "backup-subnet"],
)
def test_stack_parameters_are_template_parameters(changes: dict[str, Any]) -> None:
    params = rq.stack_parameters(validate_cluster(patched(example_data(), **changes)))
    declared = template()["Parameters"]
    for key, value in params.items():
        assert key in declared, f"{key} is not a parameter of {TEMPLATE.name}"
        allowed = declared[key].get("AllowedValues")
        assert allowed is None or value in [str(a) for a in allowed], (key, value, allowed)
        pattern = declared[key].get("AllowedPattern")
        assert pattern is None or re.fullmatch(pattern, value), (key, value, pattern)
    assert params["CreateFSx"] == ("true" if changes == {} or "network__backup_az_id" in changes else "false")
    assert params["ExistingFSxId"] == ("fs-0123456789abcdef0" if changes.get("fsx") == EXISTING_FSX else "")


def test_the_request_reads_outputs_the_template_declares() -> None:
    declared = set(template()["Outputs"])
    used = {rq.OUT_SUBNET, rq.OUT_SECURITY_GROUP, rq.OUT_ROLE, rq.OUT_BUCKET, rq.OUT_FSX_ID, rq.OUT_FSX_DNS,
            rq.OUT_FSX_MOUNT}  # fmt: skip
    assert used <= declared, used - declared
