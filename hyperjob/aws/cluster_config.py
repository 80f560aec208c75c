"""The cluster config: one YAML file describing a SageMaker HyperPod Slurm cluster, read by `hyperjob cluster ...`.

It is not the training config's `cluster:` section (sbatch values): it says which machines exist. Everything
CreateCluster would refuse (names, counts, instance types, ids, the S3 prefix) is refused here first, naming the key,
so a typo costs a second instead of a cluster that fails twenty minutes later. Imported only by the cluster verbs;
no boto3 here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from hyperjob.backends.catalogue import natural_key
from hyperjob.config.load import ConfigError, apply_overrides, format_validation_error, read_yaml
from hyperjob.config.plugins import plugin_search_off
from hyperjob.resources import shipped_dir

# pydantic's plugin search is skipped while these models are built (hyperjob.config.plugins).
_restore_plugin_search = plugin_search_off()

ApiStyle = Literal["slurm-config", "provisioning-parameters"]
NodeRole = Literal["Controller", "Login", "Compute"]  # CreateCluster's SlurmConfig.NodeType values
DeepHealthCheck = Literal["InstanceStress", "InstanceConnectivity"]

_SIZES = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
# Instance types HyperPod offers (each one is in botocore's ClusterInstanceType enum: a test checks it).
INSTANCE_TYPES: frozenset[str] = frozenset(
    [f"ml.{t}" for t in ("trn1.32xlarge", "trn1n.32xlarge", "trn2.3xlarge", "trn2.48xlarge")]
    + [f"ml.{t}" for t in ("p4d.24xlarge", "p4de.24xlarge", "p5.4xlarge", "p5.48xlarge", "p5e.48xlarge")]
    + ["ml.p5en.48xlarge", "ml.p6-b200.48xlarge"]
    + [f"ml.{family}.{size}" for family in ("g5", "g6", "g6e") for size in _SIZES]
    + [f"ml.c5.{s}" for s in ("large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "12xlarge", "18xlarge", "24xlarge")]
    + [f"ml.c5n.{s}" for s in ("large", "2xlarge", "4xlarge", "9xlarge", "18xlarge")]
    + [f"ml.m5.{s}" for s in ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")]
    + [f"ml.t3.{s}" for s in ("medium", "large", "xlarge", "2xlarge")]
)
# Deep health checks test accelerators and EFA: AWS runs them on GPU and Trainium instances only.
ACCELERATED_PREFIXES = ("ml.p", "ml.g", "ml.trn")
MAX_INSTANCE_COUNT = 6758  # CreateCluster's ClusterInstanceCount maximum
MAX_GROUPS = 100  # CreateCluster's InstanceGroups maximum


def natural_sorted(names: Iterable[str]) -> list[str]:
    """ml.c5.2xlarge before ml.c5.12xlarge, trn1 before trn1n before trn2: the order a reader scans."""
    return sorted(names, key=lambda n: natural_key(n.removeprefix("ml.")))


def _family_letters(instance_type: str) -> str:
    """trn for ml.trn1n.32xlarge: the family without its generation, to suggest the sizes that do exist."""
    return re.split(r"[^a-z]", instance_type.removeprefix("ml."), maxsplit=1)[0]


def _instance_type(value: str) -> str:
    if value in INSTANCE_TYPES:
        return value
    if f"ml.{value}" in INSTANCE_TYPES:
        raise ValueError(f"HyperPod spells instance types with the ml. prefix: write 'ml.{value}'")
    letters = _family_letters(value)
    same = [t for t in INSTANCE_TYPES if letters and _family_letters(t) == letters]
    shown = natural_sorted(same or INSTANCE_TYPES)
    which = f"{letters} family" if same else "allowed"
    raise ValueError(f"not a HyperPod instance type ({which}: {', '.join(shown)})")


def _one_controller(count: int) -> int:
    if count != 1:
        raise ValueError("exactly one controller: the cluster runs one slurmctld (allowed: 1)")
    return count


def _matching(pattern: str, what: str) -> Callable[[str], str]:
    """A validator that needs the whole value to match (re.fullmatch: `$` would accept a trailing newline)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(what)
        return value

    return check


_API_NAME = r"[a-zA-Z0-9](-*[a-zA-Z0-9])*"  # CreateCluster's ClusterName / InstanceGroupName / PartitionName
_API_NAME_HELP = "use letters, digits and hyphens, starting and ending with a letter or digit"
_BUCKET_HELP = (
    "must be a bucket name starting with 'sagemaker-' (the cluster's instance policy, "
    "AmazonSageMakerClusterInstanceRolePolicy, reads only such buckets): lowercase letters, digits, dots, hyphens"
)
_TAG_KEY_HELP = (
    "a tag key is 1-128 letters, digits, spaces and _ . : / = + - @, not starting with aws: or hyperjob: "
    "(hyperjob sets hyperjob:cluster and hyperjob:managed itself)"
)

ApiName = Annotated[str, Field(max_length=63), AfterValidator(_matching(_API_NAME, _API_NAME_HELP))]
InstanceType = Annotated[str, AfterValidator(_instance_type)]
Count = Annotated[int, Field(ge=1, le=MAX_INSTANCE_COUNT)]
ThreadsPerCore = Literal[1, 2]
EbsGiB = Annotated[int, Field(ge=1, le=16384)]
Region = Annotated[str, AfterValidator(_matching(r"[a-z]{2}(-[a-z]+)+-[0-9]", "not a region name, e.g. us-west-2"))]
AzId = Annotated[
    str, AfterValidator(_matching(r"[a-z]+[0-9]+-az[0-9]+", "not an AZ ID such as usw2-az4 (not a name: us-west-2a)"))
]
StackName = Annotated[
    str, AfterValidator(_matching(r"[A-Za-z][A-Za-z0-9-]{0,127}", "a letter, then letters, digits, hyphens"))
]
SubnetId = Annotated[str, AfterValidator(_matching(r"subnet-[0-9a-f]{8}([0-9a-f]{9})?", "not a subnet id (subnet-…)"))]
SecurityGroupId = Annotated[
    str, AfterValidator(_matching(r"sg-[0-9a-f]{8}([0-9a-f]{9})?", "not a security group id (sg-…)"))
]
RoleArn = Annotated[
    str,
    AfterValidator(
        _matching(r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]+", "not an IAM role ARN (arn:aws:iam::…)")
    ),
]
Bucket = Annotated[str, AfterValidator(_matching(r"sagemaker-[a-z0-9]([a-z0-9.-]{0,51}[a-z0-9])?", _BUCKET_HELP))]
FsxId = Annotated[str, AfterValidator(_matching(r"fs-[0-9a-f]{8,17}", "not an FSx file system id (fs-…)"))]
FsxDns = Annotated[
    str,
    AfterValidator(
        _matching(r"fs-[0-9a-f]{8,17}\.fsx\.[a-z0-9-]+\.amazonaws\.com(\.cn)?", "not an FSx DNS name (fs-….fsx.…)")
    ),
]
FsxMountName = Annotated[
    str, AfterValidator(_matching(r"[A-Za-z0-9_-]{1,8}", "not an FSx mount name (1-8 letters, digits, _ or -)"))
]
MountPath = Annotated[
    str, AfterValidator(_matching(r"/[a-zA-Z0-9._/-]+", "must be an absolute path of letters, digits and . _ / -"))
]
FileName = Annotated[
    str, Field(max_length=128), AfterValidator(_matching(r"[A-Za-z0-9._-]+", "must be a file name, no directory"))
]
TagKey = Annotated[str, AfterValidator(_matching(r"(?!aws:|hyperjob:)[A-Za-z0-9 _.:/=+@-]{1,128}", _TAG_KEY_HELP))]
TagValue = Annotated[
    str, AfterValidator(_matching(r"[A-Za-z0-9 _.:/=+@-]{0,256}", "up to 256 letters, digits, spaces, _ . : / = + - @"))
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ControllerGroup(_Model):
    """The one node that runs slurmctld."""

    name: ApiName = "controller-machine"
    instance_type: InstanceType
    count: Annotated[int, AfterValidator(_one_controller)] = 1
    threads_per_core: ThreadsPerCore = 1
    ebs_volume_gb: EbsGiB | None = None


class LoginGroup(_Model):
    """Optional nodes users log in to, so that nobody works on the controller."""

    name: ApiName = "login-group"
    instance_type: InstanceType
    count: Count = 1
    threads_per_core: ThreadsPerCore = 1
    ebs_volume_gb: EbsGiB | None = None


class WorkerGroup(_Model):
    """Compute nodes: one Slurm partition each."""

    name: ApiName
    instance_type: InstanceType
    count: Count
    partition: ApiName
    threads_per_core: ThreadsPerCore = 1
    ebs_volume_gb: EbsGiB | None = None
    deep_health_checks: tuple[DeepHealthCheck, ...] = ()


Group = ControllerGroup | LoginGroup | WorkerGroup


class NetworkSection(_Model):
    """Where the cluster lives: created by hyperjob's CloudFormation stack, or ids of things that already exist."""

    mode: Literal["stack", "existing"] = "stack"
    # mode: stack
    stack_name: StackName | None = Field(default=None, description="default: <cluster_name>-stack")
    az_id: AzId | None = None
    backup_az_id: AzId | None = None
    # mode: existing
    subnet_ids: tuple[SubnetId, ...] | None = Field(default=None, min_length=1, max_length=16)
    security_group_id: SecurityGroupId | None = None
    execution_role_arn: RoleArn | None = None
    bucket: Bucket | None = None


class FsxSection(_Model):
    """The shared file system at /fsx: created by the stack, an existing one, or none."""

    mode: Literal["create", "existing", "none"] = "create"
    # mode: create (PERSISTENT_2)
    capacity_gib: Annotated[int, Field(ge=1200, le=48000)] = 1200  # le: the template's largest
    throughput: Literal[125, 250, 500, 1000] = 250
    compression: Literal["LZ4", "NONE"] = "LZ4"
    lustre_version: Literal["2.12", "2.15"] = "2.15"
    # mode: existing
    id: FsxId | None = None
    dns_name: FsxDns | None = None
    mount_name: FsxMountName | None = None
    # create and existing
    mount_path: MountPath = "/fsx"


class LifecycleSection(_Model):
    """The scripts every node runs when it joins the cluster (uploaded to the stack's sagemaker- bucket)."""

    scripts_dir: Path | None = Field(default=None, description="default: the lifecycle_scripts/ shipped with hyperjob")
    on_create: FileName = "on_create.sh"


class ClusterConfig(_Model):
    """The whole file; `groups()` is the one place that orders and names the instance groups for every builder."""

    region: Region | None = Field(default=None, description="default: boto3's (AWS_REGION, profile)")
    cluster_name: ApiName
    api: ApiStyle = "slurm-config"
    slurm_config_strategy: Literal["Managed", "Overwrite", "Merge"] | None = None
    node_recovery: Literal["Automatic", "None"] = "Automatic"
    controller: ControllerGroup
    login: LoginGroup | None = None
    workers: tuple[WorkerGroup, ...] = Field(min_length=1, max_length=MAX_GROUPS - 2)
    network: NetworkSection
    fsx: FsxSection = Field(default_factory=FsxSection)
    lifecycle: LifecycleSection = Field(default_factory=LifecycleSection)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=48)

    def groups(self) -> list[tuple[NodeRole, str, Group]]:
        """(node type, dotted key, group), controller first: the order of CreateCluster's InstanceGroups."""
        out: list[tuple[NodeRole, str, Group]] = [("Controller", "controller", self.controller)]
        if self.login is not None:
            out.append(("Login", "login", self.login))
        out.extend(("Compute", f"workers.{i}", w) for i, w in enumerate(self.workers))
        return out

    @property
    def stack_name(self) -> str:
        return self.network.stack_name or f"{self.cluster_name}-stack"

    @property
    def strategy(self) -> str:
        """SlurmConfigStrategy (api: slurm-config): Managed unless set."""
        return self.slurm_config_strategy or "Managed"

    def scripts_dir(self) -> Path:
        return self.lifecycle.scripts_dir or shipped_dir("lifecycle_scripts")


# --- consistency: rules that span keys, each problem named by its key ------------------------------------------


def _unique_names(cfg: ClusterConfig) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    problems = []
    for _, key, group in cfg.groups():
        if group.name in seen:
            why = "instance group names must be unique (they become InstanceGroupName values)"
            problems.append((f"{key}.name", f"{group.name!r} is already the name of {seen[group.name]}: {why}"))
        seen.setdefault(group.name, key)
    return problems


def _health_checks(cfg: ClusterConfig) -> list[tuple[str, str]]:
    problems = []
    for i, w in enumerate(cfg.workers):
        key = f"workers.{i}.deep_health_checks"
        if len(set(w.deep_health_checks)) != len(w.deep_health_checks):
            problems.append((key, "each check may be listed once"))
        if w.deep_health_checks and not w.instance_type.startswith(ACCELERATED_PREFIXES):
            problems.append((key, f"deep health checks run on GPU and Trainium instances only, not {w.instance_type} "
                                  "(remove the list for this group)"))  # fmt: skip
    return problems


def _unused_ids(section: BaseModel, keys: Iterable[str], prefix: str, mode: str) -> list[tuple[str, str]]:
    """Ids of existing things set beside a mode that creates new ones: they would be ignored, so say so.

    (Settings of another mode, such as fsx.capacity_gib with fsx.mode: none, are ignored without a word, so that
    `--set fsx.mode=none` works on a config that has them.)
    """
    return [(f"{prefix}.{k}", f"only used with {prefix}.mode: {mode}") for k in keys if k in section.model_fields_set]


_EXISTING_KEYS = ("subnet_ids", "security_group_id", "execution_role_arn", "bucket")


def _network(cfg: ClusterConfig) -> list[tuple[str, str]]:
    net = cfg.network
    if net.mode == "existing":
        return [(f"network.{k}", "required with network.mode: existing") for k in _EXISTING_KEYS
                if getattr(net, k) is None]  # fmt: skip
    problems = _unused_ids(net, _EXISTING_KEYS, "network", "existing")
    if net.az_id is None:
        problems.append(("network.az_id", "required with network.mode: stack: the AZ ID of the private subnet, "
                                          "e.g. usw2-az4 (where the instance type is offered)"))  # fmt: skip
    elif net.backup_az_id == net.az_id:
        problems.append(("network.backup_az_id", f"{net.backup_az_id!r} is network.az_id: choose a second AZ ID"))
    expected = _az_prefix(cfg.region)
    for key in ("az_id", "backup_az_id"):
        value = getattr(net, key)
        if value is not None and expected and not value.startswith(f"{expected}-"):
            problems.append((f"network.{key}", f"{value!r} is not in region {cfg.region} (its AZ IDs start with "
                                               f"{expected}-)"))  # fmt: skip
    return problems


_DIRECTIONS = {"north": "n", "south": "s", "east": "e", "west": "w", "central": "c", "northeast": "ne",
               "southeast": "se", "northwest": "nw", "southwest": "sw", "gov": "g"}  # fmt: skip


def _az_prefix(region: str | None) -> str | None:
    """us-west-2 -> usw2, ap-northeast-1 -> apne1; None where the region's words are not the usual ones."""
    if region is None:
        return None
    country, *words, number = region.split("-")
    if not all(w in _DIRECTIONS for w in words):
        return None
    return country + "".join(_DIRECTIONS[w] for w in words) + number


_FSX_IDS = ("id", "dns_name", "mount_name")


def _fsx(cfg: ClusterConfig) -> list[tuple[str, str]]:
    fsx = cfg.fsx
    if fsx.mode == "existing":
        problems = [(f"fsx.{k}", "required with fsx.mode: existing") for k in _FSX_IDS if getattr(fsx, k) is None]
        if fsx.id and fsx.dns_name and not fsx.dns_name.startswith(f"{fsx.id}."):
            problems.append(("fsx.dns_name", f"{fsx.dns_name!r} is not the DNS name of fsx.id {fsx.id}"))
        return problems
    problems = _unused_ids(fsx, _FSX_IDS, "fsx", "existing")
    if fsx.mode == "create" and cfg.network.mode == "existing":
        problems.append(("fsx.mode", "create needs network.mode: stack (hyperjob's stack creates the file system); "
                                     "with existing ids use fsx.mode: existing (fsx.id, fsx.dns_name, fsx.mount_name) "
                                     "or none"))  # fmt: skip
    if fsx.mode == "create" and fsx.capacity_gib != 1200 and fsx.capacity_gib % 2400:
        problems.append(("fsx.capacity_gib", f"{fsx.capacity_gib} is not allowed: PERSISTENT_2 takes 1200 or a "
                                             "multiple of 2400 GiB (2400, 4800, 7200, ...)"))  # fmt: skip
    return problems


def consistency_problems(cfg: ClusterConfig) -> list[tuple[str, str]]:
    """Rules across keys: unique group names, what each mode requires, health checks, AZ vs region."""
    return _unique_names(cfg) + _health_checks(cfg) + _network(cfg) + _fsx(cfg)


# --- loading --------------------------------------------------------------------------------------------------


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model at a path of field names and list indexes (() is the whole config), or None for a value."""
    model: type[BaseModel] | None = ClusterConfig
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue  # an item of a tuple of models: the item's model was found at its field
        if part not in model.model_fields:
            return None
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly, in an Optional or in a tuple (WorkerGroup for tuple[WorkerGroup, ...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    """hyperjob.config's messages, with unknown keys and sections explained against this config's models."""
    problems = []
    for (key, msg), e in zip(format_validation_error(err), err.errors(include_url=False), strict=True):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section_at(loc[:-1])
            msg = "unknown key" + (f"; allowed keys here: {', '.join(sorted(parent.model_fields))}" if parent else "")
        elif e["type"] == "model_type" and (section := _section_at(loc)) is not None:
            msg = f"a section, not a value: set its keys ({', '.join(section.model_fields)})"
        problems.append((key.removesuffix(".[key]"), msg))  # a dict key's own problem: name the key
    return problems


def validate_cluster(data: dict[str, Any], source: str = "cluster config") -> ClusterConfig:
    """Check the shape of every key, then the rules across keys; raise ConfigError naming each bad key."""
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_problems(err), source) from None
    problems = consistency_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _resolve_scripts_dir(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A relative lifecycle.scripts_dir is relative to the config file, as paths are in the training config."""
    lifecycle = data.get("lifecycle")
    if isinstance(lifecycle, dict) and isinstance(lifecycle.get("scripts_dir"), str) and lifecycle["scripts_dir"]:
        path = Path(lifecycle["scripts_dir"]).expanduser()
        path = path if path.is_absolute() else (base / path).resolve()
        data = {**data, "lifecycle": {**lifecycle, "scripts_dir": str(path)}}
    return data


def check_lifecycle_scripts(cfg: ClusterConfig) -> None:
    """The scripts directory and its entry script must exist before anything is created or uploaded."""
    try:
        scripts = cfg.scripts_dir()
    except FileNotFoundError as e:
        raise ConfigError([("lifecycle.scripts_dir", str(e))]) from None
    if not scripts.is_dir():
        raise ConfigError([("lifecycle.scripts_dir", f"{scripts} is not a directory")])
    if not (scripts / cfg.lifecycle.on_create).is_file():
        raise ConfigError([("lifecycle.on_create", f"{cfg.lifecycle.on_create} is not a file in {scripts}")])


def load_cluster_config(path: Path | str, overrides: Iterable[str] = (), *, check_inputs: bool = True) -> ClusterConfig:
    """Read, override (`--set key=value`), resolve the scripts path against the file, validate."""
    path = Path(path)
    data = _resolve_scripts_dir(apply_overrides(read_yaml(path), overrides), path.resolve().parent)
    cfg = validate_cluster(data, str(path))
    if check_inputs:
        try:
            check_lifecycle_scripts(cfg)
        except ConfigError as e:
            raise ConfigError(e.problems, str(path)) from None
    return cfg


_restore_plugin_search()
