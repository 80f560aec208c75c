"""The cluster's life (create/describe/nodes/delete) against a real moto server; polling, failures and refusals with
botocore's Stubber on the real service model; ssh_config's exact text; preflight's problem lines."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.exceptions import ParamValidationError
from botocore.stub import Stubber

from hyperjob.aws import cluster, preflight
from hyperjob.aws.cluster_config import ClusterConfig, validate_cluster
from hyperjob.aws.errors import AwsError
from hyperjob.aws.request import OUT_BUCKET, OUT_ROLE, OUT_SECURITY_GROUP, OUT_SUBNET, create_cluster_request
from hyperjob.aws.ssh import ssh_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hyperpod-trn1.yaml"
REGION = "us-west-2"
ROLE = "arn:aws:iam::123456789012:role/hyperpod"
SCRIPTS = "s3://sagemaker-lifecycle-bucket/hyperjob/hyperjob-trn1/lifecycle/"
ARN = "arn:aws:sagemaker:us-west-2:123456789012:cluster/abc123xyz"
NAME = "hyperjob-trn1"


def _config(**changes: Any) -> ClusterConfig:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["fsx"] = {"mode": "none"}
    data.update(changes)
    return validate_cluster(data)


def _network(ec2: Any, *, public: bool = False, efa_rules: bool = True, az: str = "us-west-2d") -> tuple[str, str]:
    """A VPC with one subnet (optionally routed to an internet gateway) and a security group (optionally EFA-ready)."""
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
    if public:
        igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
        ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    sg = ec2.create_security_group(GroupName="efa", Description="efa", VpcId=vpc)["GroupId"]
    if efa_rules:
        rule = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}]
        ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=rule)
        ec2.authorize_security_group_egress(GroupId=sg, IpPermissions=rule)
    return subnet, sg


def _existing(subnet: str, sg: str, bucket: str = "sagemaker-lifecycle-bucket") -> ClusterConfig:
    network = {"mode": "existing", "subnet_ids": [subnet], "security_group_id": sg, "execution_role_arn": ROLE,
               "bucket": bucket}  # fmt: skip
    return _config(network=network)


# --- moto: the whole life ---------------------------------------------------------------------------------------


def test_life_on_moto(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION))
    cfg = _existing(subnet, sg)
    lines: list[str] = []
    assert cluster.describe(cfg) is None

    first = cluster.create_cluster(cfg, {}, SCRIPTS, log=lines.append)
    assert first.created and first.arn.startswith("arn:aws:sagemaker:us-west-2:") and NAME in first.arn

    lines.clear()
    again = cluster.create_cluster(cfg, {}, SCRIPTS, log=lines.append)
    assert again == cluster.CreateResult(created=False, arn=first.arn)
    assert lines == [f"cluster {NAME} exists (InService): nothing created"]
    assert len(boto3.client("sagemaker", region_name=REGION).list_clusters()["ClusterSummaries"]) == 1

    described = cluster.describe(cfg)
    assert described is not None and described["ClusterStatus"] == "InService"
    assert described["VpcConfig"] == {"SecurityGroupIds": [sg], "Subnets": [subnet]}
    assert cluster.wait_in_service(cfg, log=lines.append, sleep=_no_sleep)["ClusterArn"] == first.arn

    nodes = cluster.list_nodes(cfg)
    assert sorted(n["InstanceGroupName"] for n in nodes) == ["controller-machine", "login-group", "trn1-workers"]

    lines.clear()
    assert cluster.delete_cluster(cfg, log=lines.append, sleep=_no_sleep) is True
    assert cluster.describe(cfg) is None
    assert lines == [f"cluster {NAME} deleting", f"cluster {NAME} deleted"]
    assert cluster.delete_cluster(cfg, log=lines.append) is False


def test_second_create_reports_group_differences(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION))
    cluster.create_cluster(_existing(subnet, sg), {}, SCRIPTS, log=lambda _: None)
    changed = _existing(subnet, sg).model_dump(exclude_unset=True)
    changed["workers"][0]["count"] = 4
    lines: list[str] = []
    assert not cluster.create_cluster(validate_cluster(changed), {}, SCRIPTS, log=lines.append).created
    assert lines[1:] == ["  differs: workers.0: group 'trn1-workers' has 1 instances, the config says 4"]


def test_stack_outputs_mode_on_moto(aws_env: str) -> None:
    outputs = {OUT_SUBNET: "subnet-0123456789abcdef0", OUT_SECURITY_GROUP: "sg-0123456789abcdef0", OUT_ROLE: ROLE,
               OUT_BUCKET: "sagemaker-lifecycle-bucket"}  # fmt: skip
    cfg = _config()
    assert cluster.create_cluster(cfg, outputs, SCRIPTS, log=lambda _: None).created
    described = cluster.describe(cfg)
    assert described is not None and [g["SlurmConfig"]["NodeType"] for g in described["InstanceGroups"]] == [
        "Controller", "Login", "Compute"]  # fmt: skip


def test_delete_refuses_a_cluster_hyperjob_did_not_tag(aws_env: str) -> None:
    cfg = _config()
    outputs = {OUT_SUBNET: "subnet-0123456789abcdef0", OUT_SECURITY_GROUP: "sg-0123456789abcdef0", OUT_ROLE: ROLE,
               OUT_BUCKET: "sagemaker-lifecycle-bucket"}  # fmt: skip
    request = create_cluster_request(cfg, outputs, SCRIPTS)
    request["Tags"] = [{"Key": "owner", "Value": "someone"}]
    boto3.client("sagemaker", region_name=REGION).create_cluster(**request)
    with pytest.raises(
        AwsError,
        match="refusing to delete cluster hyperjob-trn1: hyperjob did not create it "
        r"\(tags hyperjob:cluster=\(missing\), hyperjob:managed=\(missing\)",
    ):
        cluster.delete_cluster(cfg, log=lambda _: None)
    assert cluster.describe(cfg) is not None


# --- Stubber: what moto cannot show -----------------------------------------------------------------------------


def _no_sleep(_: float) -> None:
    pass


class FakeClock:
    """sleep() advances now(): the timeout logic runs for real without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stubber]:
    """A real botocore SageMaker client (real service model) with a Stubber; cluster._client hands it out."""
    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    monkeypatch.setattr(cluster, "_client", lambda service, region: client)
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


def _description(status: str, counts: list[tuple[str, int, int]], failure: str = "") -> dict[str, Any]:
    groups = [{"InstanceGroupName": g, "CurrentCount": c, "TargetCount": t, "InstanceType": "ml.trn1.32xlarge"}
              for g, c, t in counts]  # fmt: skip
    out: dict[str, Any] = {"ClusterArn": ARN, "ClusterName": NAME, "ClusterStatus": status,
                           "CreationTime": datetime.datetime(2026, 1, 1), "InstanceGroups": groups}  # fmt: skip
    if failure:
        out["FailureMessage"] = failure
    return out


def test_polls_until_in_service_with_backoff_and_progress(stubbed: Stubber) -> None:
    for answer in [
        _description("Creating", [("controller-machine", 0, 1), ("trn1-workers", 0, 2)]),
        _description("Creating", [("controller-machine", 0, 1), ("trn1-workers", 0, 2)]),
        _description("Creating", [("controller-machine", 1, 1), ("trn1-workers", 1, 2)]),
        _description("InService", [("controller-machine", 1, 1), ("trn1-workers", 2, 2)]),
    ]:
        stubbed.add_response("describe_cluster", answer, {"ClusterName": NAME})
    fake, lines = FakeClock(), []
    result = cluster.wait_in_service(_config(), log=lines.append, sleep=fake.sleep, clock=fake.clock)
    assert result["ClusterStatus"] == "InService"
    assert lines == [
        "Creating: controller-machine 0/1, trn1-workers 0/2",
        "Creating: controller-machine 1/1, trn1-workers 1/2",
        "InService: controller-machine 1/1, trn1-workers 2/2",
    ]
    assert fake.sleeps == [5.0, 10.0, 20.0]


def test_failed_cluster_names_failure_message_and_log_group(stubbed: Stubber) -> None:
    stubbed.add_response("describe_cluster", _description("Creating", [("trn1-workers", 0, 1)]), {"ClusterName": NAME})
    failed = _description("Failed", [("trn1-workers", 0, 1)], failure="Lifecycle scripts did not run successfully")
    stubbed.add_response("describe_cluster", failed, {"ClusterName": NAME})
    fake = FakeClock()
    with pytest.raises(AwsError) as info:
        cluster.wait_in_service(_config(), log=lambda _: None, sleep=fake.sleep, clock=fake.clock)
    assert str(info.value) == (
        "cluster hyperjob-trn1 is Failed: Lifecycle scripts did not run successfully (lifecycle script logs: "
        "CloudWatch log group /aws/sagemaker/Clusters/hyperjob-trn1/abc123xyz)"
    )


def test_timeout_says_what_it_last_saw(stubbed: Stubber) -> None:
    creating = _description("Creating", [("trn1-workers", 1, 4)])
    for _ in range(4):  # looks at 0, 5, 15 and 35 s (the last sleep is cut to the 5 s left); the fifth is at 40 s
        stubbed.add_response("describe_cluster", creating, {"ClusterName": NAME})
    stubbed.add_response("describe_cluster", creating, {"ClusterName": NAME})
    fake = FakeClock()
    with pytest.raises(AwsError, match=r"not InService after 40 s; last seen: Creating: trn1-workers 1/4$"):
        cluster.wait_in_service(_config(), timeout_s=40, log=lambda _: None, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == [5.0, 10.0, 20.0, 5.0]


def test_access_denied_on_create(stubbed: Stubber) -> None:
    stubbed.add_client_error("describe_cluster", "ValidationException", "Could not find cluster 'hyperjob-trn1'.")
    message = "User: arn:aws:iam::123456789012:user/u is not authorized to perform: sagemaker:CreateCluster"
    stubbed.add_client_error("create_cluster", "AccessDeniedException", message, 400)
    outputs = {OUT_SUBNET: "subnet-0123456789abcdef0", OUT_SECURITY_GROUP: "sg-0123456789abcdef0", OUT_ROLE: ROLE,
               OUT_BUCKET: "sagemaker-lifecycle-bucket"}  # fmt: skip
    with pytest.raises(AwsError, match=r"^not allowed to call sagemaker:CreateCluster \(AccessDeniedException\)"):
        cluster.create_cluster(_config(), outputs, SCRIPTS, log=lambda _: None)


def test_misspelled_request_field_fails_before_sending(stubbed: Stubber, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {OUT_SUBNET: "subnet-0123456789abcdef0", OUT_SECURITY_GROUP: "sg-0123456789abcdef0", OUT_ROLE: ROLE,
               OUT_BUCKET: "sagemaker-lifecycle-bucket"}  # fmt: skip
    request = create_cluster_request(_config(), outputs, SCRIPTS)
    request["InstanceGroup"] = request.pop("InstanceGroups")
    # botocore itself refuses it offline: the endpoint is a closed port, so a sent request would fail differently
    offline = boto3.client("sagemaker", region_name=REGION, endpoint_url="http://127.0.0.1:9",
                           aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    with pytest.raises(ParamValidationError, match='Unknown parameter in input: "InstanceGroup"'):
        offline.create_cluster(**request)
    # and create_cluster checks before calling CreateCluster (no CreateCluster response is stubbed)
    stubbed.add_client_error("describe_cluster", "ResourceNotFound", "Cluster not found")
    monkeypatch.setattr(cluster, "create_cluster_request", lambda *_: request)
    with pytest.raises(ValueError, match='Unknown parameter in input: "InstanceGroup"'):
        cluster.create_cluster(_config(), outputs, SCRIPTS, log=lambda _: None)


def test_delete_waits_until_gone(stubbed: Stubber) -> None:
    stubbed.add_response("describe_cluster", _description("InService", []), {"ClusterName": NAME})
    tags = [{"Key": "hyperjob:cluster", "Value": NAME}, {"Key": "hyperjob:managed", "Value": "true"}]
    stubbed.add_response("list_tags", {"Tags": tags}, {"ResourceArn": ARN})
    stubbed.add_response("delete_cluster", {"ClusterArn": ARN}, {"ClusterName": NAME})
    stubbed.add_response("describe_cluster", _description("Deleting", []), {"ClusterName": NAME})
    stubbed.add_client_error("describe_cluster", "ResourceNotFound", "Cluster not found")
    fake, lines = FakeClock(), []
    assert cluster.delete_cluster(_config(), log=lines.append, sleep=fake.sleep, clock=fake.clock)
    assert lines == [f"cluster {NAME} deleting", f"cluster {NAME} deleted"] and fake.sleeps == [5.0]


# --- ssh_config ---------------------------------------------------------------------------------------------------


def test_ssh_config_exact_text() -> None:
    cfg = _config(login=None)
    nodes = [
        {"InstanceGroupName": "trn1-workers", "InstanceId": "i-0bbb"},
        {"InstanceGroupName": "controller-machine", "InstanceId": "i-0ccc"},
        {"InstanceGroupName": "trn1-workers", "InstanceId": "i-0aaa"},
    ]
    proxy = "ProxyCommand aws ssm start-session --target sagemaker-cluster:abc123xyz_{}"
    tail = " --document-name AWS-StartSSHSession --parameters portNumber=%p --region us-west-2\n"
    assert ssh_config(cfg, {"ClusterArn": ARN}, nodes) == (
        f"# hyperjob cluster hyperjob-trn1 ({ARN}): needs the AWS CLI and its session-manager-plugin\n"
        "\n"
        "Host hyperjob-trn1-controller-machine-1 hyperjob-trn1-controller\n"
        "    User ubuntu\n"
        f"    {proxy.format('controller-machine-i-0ccc')}{tail}"
        "\n"
        "Host hyperjob-trn1-trn1-workers-1\n"
        "    User ubuntu\n"
        f"    {proxy.format('trn1-workers-i-0aaa')}{tail}"
        "\n"
        "Host hyperjob-trn1-trn1-workers-2\n"
        "    User ubuntu\n"
        f"    {proxy.format('trn1-workers-i-0bbb')}{tail}"
    )


def test_ssh_config_region_from_the_arn_and_user() -> None:
    cfg = _config(region=None)
    arn = ARN.replace("us-west-2", "us-east-2")
    text = ssh_config(cfg, {"ClusterArn": arn}, [{"InstanceGroupName": "controller-machine", "InstanceId": "i-1"}],
                      user="ec2-user")  # fmt: skip
    assert "--region us-east-2\n" in text and "    User ec2-user\n" in text


# --- preflight ------------------------------------------------------------------------------------------------------

QUOTA_NOTE = "note: Service Quotas did not answer"


def test_preflight_good_network_has_only_the_quota_note(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION))
    # moto has no ListServiceQuotas: the quota check says it was skipped, and that is the only line
    assert preflight.preflight(_existing(subnet, sg), {}) == [
        f"{QUOTA_NOTE} (ClientError): cluster instance quotas not checked"
    ]


def test_preflight_public_subnet_and_missing_efa_rules(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION), public=True, efa_rules=False)
    lines = preflight.preflight(_existing(subnet, sg), {})
    problems = [line for line in lines if not line.startswith(QUOTA_NOTE)]
    assert len(problems) == 3, lines
    assert problems[0].startswith(f"subnet {subnet} is public (its route table sends traffic to internet gateway igw-")
    assert (
        problems[1] == f"security group {sg} lacks the EFA ingress rule: all traffic (protocol -1) from itself ({sg})"
    )
    assert problems[2] == f"security group {sg} lacks the EFA egress rule: all traffic (protocol -1) to itself ({sg})"


def test_preflight_wrong_s3_prefix(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION))
    outputs = {OUT_SUBNET: subnet, OUT_SECURITY_GROUP: sg, OUT_ROLE: ROLE, OUT_BUCKET: "my-bucket"}
    lines = preflight.preflight(_config(), outputs)
    assert lines[0] == ("lifecycle scripts URI s3://my-bucket/hyperjob/hyperjob-trn1/lifecycle/ must start with "
                        "s3://sagemaker-: the cluster's instance policy (AmazonSageMakerClusterInstanceRolePolicy) "
                        "reads only such buckets")  # fmt: skip


def test_preflight_instance_type_not_offered_in_the_subnets_az(aws_env: str) -> None:
    subnet, sg = _network(boto3.client("ec2", region_name=REGION), az="us-west-2a")  # moto: trn1 in 2b and 2d only
    problems = [line for line in preflight.preflight(_existing(subnet, sg), {}) if not line.startswith(QUOTA_NOTE)]
    assert len(problems) == 1 and problems[0].startswith("ml.trn1.32xlarge is not offered in us-west-2a (usw2-az")
    assert problems[0].endswith("): choose another AZ ID (network.az_id) or instance type")


def test_preflight_existing_fsx_in_another_az_and_the_quota_note(aws_env: str) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    subnet, sg = _network(ec2)
    vpc = ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["VpcId"]
    other = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.2.0/24", AvailabilityZone="us-west-2b")["Subnet"]["SubnetId"]
    fs = boto3.client("fsx", region_name=REGION).create_file_system(
        FileSystemType="LUSTRE", StorageCapacity=1200, SubnetIds=[other],
        LustreConfiguration={"DeploymentType": "PERSISTENT_2", "PerUnitStorageThroughput": 250},
    )["FileSystem"]  # fmt: skip
    data = _existing(subnet, sg).model_dump(exclude_unset=True)
    data["fsx"] = {"mode": "existing", "id": fs["FileSystemId"], "dns_name": fs["DNSName"], "mount_name": "abcdefgh"}
    lines = preflight.preflight(validate_cluster(data), {})
    assert lines == [
        f"fsx.id: file system {fs['FileSystemId']} is in us-west-2b, the cluster's subnets in us-west-2d: "
        "Lustre must be in the cluster's AZ",
        f"{QUOTA_NOTE} (ClientError): cluster instance quotas not checked",
    ]


def test_quota_below_the_configs_count(monkeypatch: pytest.MonkeyPatch) -> None:
    client = boto3.client("service-quotas", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    monkeypatch.setattr(preflight, "_client", lambda service, region: client)
    quotas = [{"QuotaName": "ml.trn1.32xlarge for cluster usage", "Value": 0.0},
              {"QuotaName": "ml.c5.xlarge for cluster usage", "Value": 4.0}]  # fmt: skip
    with Stubber(client) as stub:
        stub.add_response("list_service_quotas", {"Quotas": quotas}, {"ServiceCode": "sagemaker"})
        assert preflight.quota_problems(_config()) == [
            "quota 'ml.trn1.32xlarge for cluster usage' is 0, the config needs 1: request an increase in Service "
            "Quotas (SageMaker)"
        ]


def test_preflight_access_denied_names_the_action(monkeypatch: pytest.MonkeyPatch) -> None:
    client = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    monkeypatch.setattr(preflight, "_client", lambda service, region: client)
    with Stubber(client) as stub:
        stub.add_client_error("describe_subnets", "UnauthorizedOperation", "You are not authorized")
        with pytest.raises(AwsError, match=r"^not allowed to call ec2:DescribeSubnets \(UnauthorizedOperation\)"):
            preflight.preflight(_existing("subnet-0123456789abcdef0", "sg-0123456789abcdef0"), {})
