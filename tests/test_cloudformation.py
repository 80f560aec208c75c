"""cloudformation/: cfn-lint, the network template's structure, and a real CreateStack on moto's HTTP server.

The structural tests pin what HyperPod and hyperjob rely on (EFA rules, the `sagemaker-` bucket prefix, the role's
permissions, FSx only when asked, the output keys); the moto tests prove the template actually deploys with FSx off
(moto cannot model FSx in CloudFormation) and with an existing file system id.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from cfnlint.schema import PROVIDER_SCHEMA_MANAGER
from fixtures_moto import MOTO_REGION

REPO = Path(__file__).resolve().parents[1]
CFN_DIR = REPO / "cloudformation"
TEMPLATE = CFN_DIR / "hyperpod-network.yaml"
VENV_BIN = Path(sys.executable).parent
REGION = MOTO_REGION

BASE_OUTPUTS = {
    "VPC",
    "PublicSubnet",
    "PrimaryPrivateSubnet",
    "SecurityGroup",
    "AmazonSagemakerClusterExecutionRoleArn",
    "AmazonS3BucketName",
}
FSX_ATTRIBUTE_OUTPUTS = {"FSxLustreFilesystemDNSname", "FSxLustreFilesystemMountname"}
ALL_OUTPUTS = BASE_OUTPUTS | FSX_ATTRIBUTE_OUTPUTS | {"BackupPrivateSubnet", "FSxLustreFilesystemId"}
ENI_ACTIONS = {
    "ec2:CreateNetworkInterface",
    "ec2:CreateNetworkInterfacePermission",
    "ec2:DeleteNetworkInterface",
    "ec2:DeleteNetworkInterfacePermission",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeVpcs",
    "ec2:DescribeDhcpOptions",
    "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups",
    "ec2:DetachNetworkInterface",
    "ec2:CreateTags",
}
CLUSTER_TAG, MANAGED_TAG = "hyperjob:cluster", "hyperjob:managed"
EXISTING_FSX = "fs-0123456789abcdef0"


# --- loading the template (CloudFormation's short-form tags become their long form) -----------------------------


class _CfnLoader(yaml.SafeLoader):
    """A SafeLoader that turns `!Ref X` into {"Ref": "X"}, `!GetAtt A.B` into {"Fn::GetAtt": ["A", "B"]}, etc."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    key = suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}"
    return {key: value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    loaded = yaml.load(path.read_text(), Loader=_CfnLoader)  # a SafeLoader subclass: no arbitrary objects
    assert isinstance(loaded, dict), f"{path} is not a YAML mapping"
    return loaded


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def resources_of_type(template: dict[str, Any], cfn_type: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == cfn_type}


def points_at(value: Any, logical_id: str) -> bool:
    """True for `!Ref logical_id` or `!GetAtt logical_id.<attr>`."""
    return value == {"Ref": logical_id} or (
        isinstance(value, dict) and value.get("Fn::GetAtt", [None])[0] == logical_id
    )


def mentions(value: Any, logical_id: str) -> bool:
    """Whether a Ref or GetAtt anywhere inside `value` names `logical_id`."""
    if points_at(value, logical_id):
        return True
    if isinstance(value, dict):
        return any(mentions(v, logical_id) for v in value.values())
    if isinstance(value, list):
        return any(mentions(v, logical_id) for v in value)
    return False


def evaluate_condition(template: dict[str, Any], expr: Any, params: dict[str, str]) -> bool:
    """CloudFormation's condition functions over parameter values (defaults filled in), enough for our template."""
    if isinstance(expr, dict) and "Condition" in expr:
        return evaluate_condition(template, template["Conditions"][expr["Condition"]], params)
    ((fn, args),) = expr.items()
    if fn == "Fn::Equals":
        left, right = (params[a["Ref"]] if isinstance(a, dict) else a for a in args)
        return bool(left == right)
    if fn == "Fn::Not":
        return not evaluate_condition(template, args[0], params)
    if fn == "Fn::And":
        return all(evaluate_condition(template, a, params) for a in args)
    if fn == "Fn::Or":
        return any(evaluate_condition(template, a, params) for a in args)
    raise AssertionError(f"unexpected condition function {fn}")


def condition_holds(template: dict[str, Any], name: str, **given: str) -> bool:
    params = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()} | given
    return evaluate_condition(template, {"Condition": name}, params)


# --- cfn-lint ---------------------------------------------------------------------------------------------------


def run_cfn_lint(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "cfn-lint"), "--", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


def test_cfn_lint_passes_on_every_template() -> None:
    templates = sorted(p for p in CFN_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json", ".template"))
    assert TEMPLATE in templates
    result = run_cfn_lint(templates)
    assert result.returncode == 0, f"cfn-lint failed:\n{result.stdout}{result.stderr}"


def test_cfn_lint_rejects_a_misspelled_property(tmp_path: Path) -> None:
    """The lint gate bites: the template with one property misspelled fails (so the ignore list hides no error)."""
    broken = tmp_path / "broken.yaml"
    text = TEMPLATE.read_text()
    assert "      CidrBlock: !Ref VpcCidr" in text
    broken.write_text(text.replace("      CidrBlock: !Ref VpcCidr", "      CidrBlok: !Ref VpcCidr"))
    result = run_cfn_lint([broken])
    assert result.returncode != 0
    assert "CidrBlok" in result.stdout, result.stdout


# --- structure --------------------------------------------------------------------------------------------------


def test_efa_security_group_references_itself_both_ways_and_egresses_anywhere(template: dict[str, Any]) -> None:
    ((sg_id, sg),) = resources_of_type(template, "AWS::EC2::SecurityGroup").items()
    ingress = resources_of_type(template, "AWS::EC2::SecurityGroupIngress").values()
    egress = resources_of_type(template, "AWS::EC2::SecurityGroupEgress").values()
    assert any(
        points_at(r["Properties"]["GroupId"], sg_id)
        and points_at(r["Properties"].get("SourceSecurityGroupId"), sg_id)
        and str(r["Properties"]["IpProtocol"]) == "-1"
        for r in ingress
    ), "no all-traffic ingress from the EFA group to itself"
    assert any(
        points_at(r["Properties"]["GroupId"], sg_id)
        and points_at(r["Properties"].get("DestinationSecurityGroupId"), sg_id)
        and str(r["Properties"]["IpProtocol"]) == "-1"
        for r in egress
    ), "no all-traffic egress from the EFA group to itself"
    assert {"IpProtocol": "-1", "CidrIp": "0.0.0.0/0"}.items() <= sg["Properties"]["SecurityGroupEgress"][0].items()


def test_bucket_name_starts_with_sagemaker(template: dict[str, Any]) -> None:
    ((_, bucket),) = resources_of_type(template, "AWS::S3::Bucket").items()
    name = bucket["Properties"]["BucketName"]["Fn::Sub"]
    pattern = name[0] if isinstance(name, list) else name
    assert pattern.startswith("sagemaker-"), pattern


def test_execution_role_has_the_managed_policy_eni_and_fsx_permissions(template: dict[str, Any]) -> None:
    role = template["Resources"]["AmazonSagemakerClusterExecutionRole"]["Properties"]
    (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    managed = [arn["Fn::Sub"] if isinstance(arn, dict) else arn for arn in role["ManagedPolicyArns"]]
    assert any(arn.endswith(":iam::aws:policy/AmazonSageMakerClusterInstanceRolePolicy") for arn in managed)
    actions: set[str] = set()
    for policy in role["Policies"]:
        for stmt in policy["PolicyDocument"]["Statement"]:
            assert stmt["Effect"] == "Allow"
            actions.update([stmt["Action"]] if isinstance(stmt["Action"], str) else stmt["Action"])
    assert ENI_ACTIONS | {"fsx:DescribeFileSystems"} <= actions, sorted(ENI_ACTIONS - actions)


@pytest.mark.parametrize(
    ("create", "existing", "creates", "has_fsx"),
    [
        ("true", "", True, True),
        ("true", EXISTING_FSX, False, True),
        ("false", "", False, False),
        ("false", EXISTING_FSX, False, True),
    ],
)
def test_fsx_is_created_only_when_asked_and_no_id_is_given(
    template: dict[str, Any], create: str, existing: str, creates: bool, has_fsx: bool
) -> None:
    fsx = resources_of_type(template, "AWS::FSx::FileSystem")
    assert {res.get("Condition") for res in fsx.values()} == {"CreatesFSx"}
    assert condition_holds(template, "CreatesFSx", CreateFSx=create, ExistingFSxId=existing) is creates
    assert condition_holds(template, "HasFSx", CreateFSx=create, ExistingFSxId=existing) is has_fsx


def test_fsx_is_persistent_2_with_the_allowed_sizes_and_throughputs(template: dict[str, Any]) -> None:
    ((_, fsx),) = resources_of_type(template, "AWS::FSx::FileSystem").items()
    assert fsx["Properties"]["LustreConfiguration"]["DeploymentType"] == "PERSISTENT_2"
    params = template["Parameters"]
    sizes = [int(v) for v in params["Capacity"]["AllowedValues"]]
    assert 1200 in sizes and 2400 in sizes
    assert all(size == 1200 or size % 2400 == 0 for size in sizes), sizes
    assert sorted(int(v) for v in params["PerUnitStorageThroughput"]["AllowedValues"]) == [125, 250, 500, 1000]
    assert set(params["Compression"]["AllowedValues"]) == {"NONE", "LZ4"}


def test_outputs_are_the_reference_keys_exported_under_the_stack_name(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert set(outputs) == ALL_OUTPUTS
    for key, output in outputs.items():
        assert output["Export"]["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-{key}"}, key
    assert outputs["BackupPrivateSubnet"]["Condition"] == "HasBackupSubnet"
    assert outputs["FSxLustreFilesystemId"]["Condition"] == "HasFSx"


def test_every_output_that_names_the_file_system_is_conditional(template: dict[str, Any]) -> None:
    """An unconditional one would fail CreateStack whenever FSx is not created (and always on moto)."""
    naming = {key for key, out in template["Outputs"].items() if mentions(out["Value"], "FSxLustreFilesystem")}
    assert naming == FSX_ATTRIBUTE_OUTPUTS | {"FSxLustreFilesystemId"}
    for key in FSX_ATTRIBUTE_OUTPUTS:
        output = template["Outputs"][key]
        assert output["Condition"] == "CreatesFSx"
        assert output["Value"]["Fn::If"][0] == "CreatesFSx", f"{key}: moto evaluates export values unconditionally"


def test_every_taggable_resource_carries_the_hyperjob_tags(template: dict[str, Any]) -> None:
    for name, res in template["Resources"].items():
        schema = PROVIDER_SCHEMA_MANAGER.get_resource_schema(REGION, res["Type"]).schema
        if "Tags" not in schema["properties"]:
            continue
        tags = {t["Key"]: t["Value"] for t in res["Properties"].get("Tags", [])}
        assert tags.get(CLUSTER_TAG) == {"Ref": "ClusterName"}, f"{name} lacks {CLUSTER_TAG}"
        assert tags.get(MANAGED_TAG) == "true", f"{name} lacks {MANAGED_TAG}"


def test_private_subnets_route_through_the_nat_and_the_public_one_through_the_gateway(
    template: dict[str, Any],
) -> None:
    routes = {
        r["Properties"]["RouteTableId"]["Ref"]: r["Properties"]
        for r in resources_of_type(template, "AWS::EC2::Route").values()
    }
    table_of = {
        a["Properties"]["SubnetId"]["Ref"]: a["Properties"]["RouteTableId"]["Ref"]
        for a in resources_of_type(template, "AWS::EC2::SubnetRouteTableAssociation").values()
    }
    for subnet in ("PrimaryPrivateSubnet", "BackupPrivateSubnet"):
        assert "NatGatewayId" in routes[table_of[subnet]] and "GatewayId" not in routes[table_of[subnet]], subnet
    assert points_at(routes[table_of["PublicSubnet"]]["GatewayId"], "InternetGateway")
    nat = next(iter(resources_of_type(template, "AWS::EC2::NatGateway").values()))
    assert points_at(nat["Properties"]["SubnetId"], "PublicSubnet")
    ((_, endpoint),) = resources_of_type(template, "AWS::EC2::VPCEndpoint").items()
    assert endpoint["Properties"]["VpcEndpointType"] == "Gateway"
    assert endpoint["Properties"]["ServiceName"] == {"Fn::Sub": "com.amazonaws.${AWS::Region}.s3"}


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("usw2-az4", True),
        ("use1-az6", True),
        ("apne1-az1", True),
        ("use1-atl1-az1", True),
        ("us-west-2a", False),
        ("usw2", False),
    ],
)
def test_subnets_take_availability_zone_ids(template: dict[str, Any], value: str, ok: bool) -> None:
    pattern = template["Parameters"]["PrimarySubnetAZ"]["AllowedPattern"]
    assert bool(re.fullmatch(pattern, value)) is ok
    for name, subnet in resources_of_type(template, "AWS::EC2::Subnet").items():
        assert "AvailabilityZoneId" in subnet["Properties"] and "AvailabilityZone" not in subnet["Properties"], name


# --- a real CreateStack on moto's server --------------------------------------------------------------------------


def create_stack(name: str, **params: str) -> dict[str, Any]:
    """CreateStack with the template and `params`; returns DescribeStacks' stack."""
    cfn = boto3.client("cloudformation")
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    cfn.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    (stack,) = cfn.describe_stacks(StackName=name)["Stacks"]
    return dict(stack)


def outputs_of(stack: dict[str, Any]) -> dict[str, str]:
    for out in stack["Outputs"]:
        assert out["ExportName"] == f"{stack['StackName']}-{out['OutputKey']}", out
    return {out["OutputKey"]: out["OutputValue"] for out in stack["Outputs"]}


def test_moto_creates_the_stack_with_fsx_off(aws_env: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == aws_env
    stack = create_stack("hj-demo", ClusterName="demo", PrimarySubnetAZ="usw2-az4", CreateFSx="false")
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    outputs = outputs_of(stack)
    assert set(outputs) == BASE_OUTPUTS

    bucket = outputs["AmazonS3BucketName"]
    assert bucket.startswith("sagemaker-"), bucket
    assert bucket == bucket.lower() and len(bucket) <= 63, bucket
    boto3.client("s3").head_bucket(Bucket=bucket)

    role_name = outputs["AmazonSagemakerClusterExecutionRoleArn"].rsplit("/", 1)[1]
    role = boto3.client("iam").get_role(RoleName=role_name)["Role"]
    assert role["Arn"] == outputs["AmazonSagemakerClusterExecutionRoleArn"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}

    ec2 = boto3.client("ec2")
    tagged = [{"Name": f"tag:{CLUSTER_TAG}", "Values": ["demo"]}, {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    subnets = {s["SubnetId"]: s for s in ec2.describe_subnets(Filters=tagged)["Subnets"]}
    assert set(subnets) == {outputs["PublicSubnet"], outputs["PrimaryPrivateSubnet"]}
    assert {s["VpcId"] for s in subnets.values()} == {outputs["VPC"]}
    (group,) = ec2.describe_security_groups(GroupIds=[outputs["SecurityGroup"]])["SecurityGroups"]
    assert group["VpcId"] == outputs["VPC"]
    self_rules = [p for p in group["IpPermissions"] if p["IpProtocol"] == "-1"]
    assert [pair["GroupId"] for p in self_rules for pair in p["UserIdGroupPairs"]] == [outputs["SecurityGroup"]]


def test_moto_stack_with_a_backup_subnet_and_an_existing_file_system(aws_env: str) -> None:
    """An existing id wins over CreateFSx=true: only its id is output, and no file system is created."""
    stack = create_stack(
        "hj-reuse",
        ClusterName="reuse",
        PrimarySubnetAZ="usw2-az4",
        BackupSubnetAZ="usw2-az2",
        CreateFSx="true",
        ExistingFSxId=EXISTING_FSX,
    )
    outputs = outputs_of(stack)
    assert set(outputs) == BASE_OUTPUTS | {"BackupPrivateSubnet", "FSxLustreFilesystemId"}
    assert outputs["FSxLustreFilesystemId"] == EXISTING_FSX
    (backup,) = boto3.client("ec2").describe_subnets(SubnetIds=[outputs["BackupPrivateSubnet"]])["Subnets"]
    assert backup["VpcId"] == outputs["VPC"]
    assert {"Key": CLUSTER_TAG, "Value": "reuse"} in backup["Tags"]
    # moto lists skipped (conditional or unmodelled) resources as entries without an id or a type
    resources = boto3.client("cloudformation").describe_stack_resources(StackName="hj-reuse")["StackResources"]
    assert "BackupPrivateSubnet" in {r.get("LogicalResourceId") for r in resources}
