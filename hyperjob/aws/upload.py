"""Upload the lifecycle scripts, plus the cluster file they read, to the cluster's fixed S3 prefix.

Why: every node copies that prefix and runs on_create.sh from it. Each object carries its sha256 in metadata, so a
second `cluster create` sends only what changed, and the listing says exactly what the nodes will get. Objects under
the prefix that are no longer part of the set are removed: a stale provisioning_parameters.json left from another
`api:` style would be read before cluster_groups.json (lifecycle_scripts/README.md, "Which node am I").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperjob.aws import request
from hyperjob.aws.cluster_config import ClusterConfig, WorkerGroup
from hyperjob.aws.errors import explain
from hyperjob.aws.stack import call, client

Log = Callable[[str], None]

CLUSTER_GROUPS_FILE = "cluster_groups.json"
GENERATED = frozenset({request.PROVISIONING_PARAMETERS_FILE, CLUSTER_GROUPS_FILE})
SKIPPED_NAMES = frozenset({"README.md", "ruff.toml"})
SKIPPED_DIRS = frozenset({"__pycache__"})
SHA_KEY = "sha256"  # user metadata: x-amz-meta-sha256


@dataclass
class UploadResult:
    s3_uri: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


# --- pure: what to send -----------------------------------------------------------------------------------------


def cluster_groups(cfg: ClusterConfig, outputs: Mapping[str, str]) -> dict[str, Any]:
    """cluster_groups.json (api: slurm-config): the request's own InstanceGroups with their SlurmConfig.

    The lifecycle scripts read the roles and partitions from it (provision_config.parse_cluster_config); FSx is
    included so a node the service did not mount still mounts it.
    """
    groups = []
    for role, _, group in cfg.groups():
        slurm: dict[str, Any] = {"NodeType": role}
        if isinstance(group, WorkerGroup):
            slurm["PartitionNames"] = [group.partition]
        groups.append({"InstanceGroupName": group.name, "SlurmConfig": slurm, "ThreadsPerCore": group.threads_per_core})
    data: dict[str, Any] = {"InstanceGroups": groups}
    fsx = request.resources(cfg, outputs).fsx
    if fsx is not None:
        data["fsx_dns_name"] = fsx.dns_name
        data["fsx_mountname"] = fsx.mount_name
    return data


def cluster_file(cfg: ClusterConfig, outputs: Mapping[str, str]) -> tuple[str, bytes]:
    """(file name, content) of the cluster file the scripts read, for the config's `api:` style."""
    if cfg.api == "provisioning-parameters":
        name, data = request.PROVISIONING_PARAMETERS_FILE, request.provisioning_parameters(cfg, outputs)
    else:
        name, data = CLUSTER_GROUPS_FILE, cluster_groups(cfg, outputs)
    return name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def script_files(scripts_dir: Path) -> dict[str, Path]:
    """Relative POSIX name -> path of every file to send; no caches, docs, linter config or hidden files.

    A cluster file of either name in the directory is left out: hyperjob writes the one for the config.
    """
    files: dict[str, Path] = {}
    for path in sorted(scripts_dir.rglob("*")):
        rel = path.relative_to(scripts_dir)
        if not path.is_file() or any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if rel.name in SKIPPED_NAMES or rel.suffix == ".pyc" or rel.as_posix() in GENERATED:
            continue
        files[rel.as_posix()] = path
    return files


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix/ -> (bucket, some/prefix/)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix/)")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- side effects -----------------------------------------------------------------------------------------------


def _remote_sha(s3: Any, bucket: str, key: str) -> str | None:
    """The sha256 stored with the object, or None when there is no object (or it was not sent by hyperjob)."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise explain(e, "s3:GetObject") from e
    value = head.get("Metadata", {}).get(SHA_KEY)
    return str(value) if value else None


def _existing_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    try:  # a paginator sends its requests while it is iterated
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as e:
        raise explain(e, "s3:ListBucket") from e


def upload_lifecycle(cfg: ClusterConfig, outputs: Mapping[str, str], *, log: Log = print) -> UploadResult:
    """Send the scripts and the cluster file to `request.lifecycle_s3_uri`; only objects whose sha256 changed."""
    uri = request.lifecycle_s3_uri(cfg, outputs)
    bucket, prefix = split_s3_uri(uri)
    contents = {name: path.read_bytes() for name, path in script_files(cfg.scripts_dir()).items()}
    generated_name, generated = cluster_file(cfg, outputs)
    contents[generated_name] = generated
    s3 = client("s3", cfg.region)
    result = UploadResult(s3_uri=uri)
    for name, data in sorted(contents.items()):
        digest = sha256(data)
        if _remote_sha(s3, bucket, prefix + name) == digest:
            result.unchanged.append(name)
            continue
        call("s3:PutObject", s3.put_object, Bucket=bucket, Key=prefix + name, Body=data, Metadata={SHA_KEY: digest})
        result.uploaded.append(name)
    stale = [key for key in _existing_keys(s3, bucket, prefix) if key[len(prefix) :] not in contents]
    for start in range(0, len(stale), 1000):
        batch = [{"Key": key} for key in stale[start : start + 1000]]
        call("s3:DeleteObject", s3.delete_objects, Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    result.removed = [key[len(prefix) :] for key in stale]
    removed = f", {len(result.removed)} stale removed" if result.removed else ""
    log(f"lifecycle scripts at {uri}: {len(result.uploaded)} uploaded, {len(result.unchanged)} unchanged{removed}")
    return result
