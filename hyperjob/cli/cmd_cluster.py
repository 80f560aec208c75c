"""`hyperjob cluster ...`: a SageMaker HyperPod Slurm cluster from one cluster config, created, checked, deleted.

Why a verb with subcommands: the cluster's life (init, validate, create, status, nodes, ssh-config, delete) shares
one config file and one error style, and none of it touches the training config. boto3 is imported only inside
the subcommands that call AWS (through hyperjob.aws), so `hyperjob --help` and the other verbs never load it.
Expected AWS failures (AwsError, missing credentials or region) are one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperjob.cli.common import EXIT_RUN_FAILED, EXIT_USAGE, CliError, table

if TYPE_CHECKING:
    from hyperjob.aws.cluster_config import ClusterConfig

EXAMPLE_NAME = "hyperpod-trn1.yaml"
DEFAULT_OUTPUT = Path("hyperpod-cluster.yaml")
DEFAULT_TIMEOUT_S = 3600.0
NOTE = "note:"  # preflight's prefix for a check it could not run
SSH_CONFIG = Path(".ssh") / "config"  # under $HOME
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError")

DESCRIPTION = """\
Provision and manage a SageMaker HyperPod Slurm cluster described by one cluster config (start with `hyperjob
cluster init`). create deploys hyperjob's CloudFormation stack (network, bucket, role, optional FSx), uploads the
lifecycle scripts and creates the cluster; running it again changes nothing that is already there."""
EPILOG = """\
examples:
  hyperjob cluster init --output cluster.yaml
  hyperjob cluster validate cluster.yaml
  hyperjob cluster create cluster.yaml --yes
  hyperjob cluster status cluster.yaml
  hyperjob cluster ssh-config cluster.yaml --write
  hyperjob cluster delete cluster.yaml --yes"""


# --- parsers ----------------------------------------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from hyperjob.cli.main import HelpFormatter

    p = sub.add_parser("cluster", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    # The verb's own parser class loads lazily; subcommand parsers are complete as built.
    subs = p.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", title="subcommands",
                            parser_class=argparse.ArgumentParser)  # fmt: skip
    subs.required = True

    def add(name: str, help: str, func: Callable[[argparse.Namespace], int], *, config: bool = True) -> Any:
        q = subs.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        if config:
            q.add_argument("config", type=Path, metavar="CLUSTER_CONFIG", help="the cluster's YAML config")
            q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set workers.0.count=2 (repeatable)")  # fmt: skip
        q.set_defaults(func=_guarded(func))
        return q

    q = add("init", "write an annotated example cluster config", cmd_init, config=False)
    q.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE", help=f"default: ./{DEFAULT_OUTPUT}")
    q.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    add("validate", "check the config, then its network (preflight)", cmd_validate)
    q = add("create", "deploy the stack, upload lifecycle scripts, create the cluster", cmd_create)
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    q.add_argument("--no-wait", action="store_true", help="return once CreateCluster is accepted")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for InService (default {DEFAULT_TIMEOUT_S:.0f})")  # fmt: skip
    q = add("status", "the cluster's status and each group's node counts", cmd_status)
    q.add_argument("--json", action="store_true", help="DescribeCluster's answer as JSON")
    q = add("nodes", "list the nodes: group, instance, status, type, launch", cmd_nodes)
    q.add_argument("--json", action="store_true", help="ListClusterNodes' answer as JSON")
    q = add("ssh-config", "~/.ssh/config blocks that reach the nodes through SSM", cmd_ssh_config)
    q.add_argument("--write", action="store_true", help=f"add or replace the cluster's block in ~/{SSH_CONFIG}")
    q = add("delete", "delete the cluster, then hyperjob's stack", cmd_delete)
    q.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    q.add_argument("--keep-stack", action="store_true", help="delete only the cluster")


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """AWS failures the user can act on become CliError (one line, exit 1); anything else is a bug and raises."""

    def run(args: argparse.Namespace) -> int:
        from hyperjob.aws.errors import AwsError, explain

        try:
            return func(args)
        except AwsError as e:
            raise CliError(str(e), EXIT_RUN_FAILED) from None
        except Exception as e:
            if type(e).__name__ in _CREDENTIAL_ERRORS and type(e).__module__.startswith("botocore"):
                raise CliError(str(explain(e, "aws")), EXIT_RUN_FAILED) from None
            raise

    return run


# --- pure helpers -----------------------------------------------------------------------------------------------


def json_default(value: Any) -> str:
    """DescribeCluster's datetimes as ISO 8601 strings."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def plan_lines(cfg: ClusterConfig) -> list[str]:
    """What `create` will make, shown before it asks."""
    lines = [f"cluster {cfg.cluster_name} in {cfg.region or 'the default region'}:"]
    if cfg.network.mode == "stack":
        fsx = ", FSx for Lustre" if cfg.fsx.mode == "create" else ""
        lines.append(f"  CloudFormation stack {cfg.stack_name}: VPC, subnets, security group, bucket, role{fsx}")
    else:
        lines.append("  network: existing (no stack)")
    lines += [f"  {role} group {g.name}: {g.count} x {g.instance_type}" for role, _, g in cfg.groups()]
    lines.append(f"  lifecycle scripts from {cfg.scripts_dir()}")
    return lines


def block_markers(cluster_name: str) -> tuple[str, str]:
    return f"# BEGIN hyperjob {cluster_name}", f"# END hyperjob {cluster_name}"


def replace_block(text: str, cluster_name: str, block: str) -> str:
    """`text` with the cluster's marked block replaced by `block` (appended when absent); other lines untouched."""
    begin, end = block_markers(cluster_name)
    lines = text.splitlines()
    new = [begin, *block.rstrip("\n").splitlines(), end]
    if begin in lines and end in lines[lines.index(begin) :]:
        start = lines.index(begin)
        stop = lines.index(end, start)
        lines[start : stop + 1] = new
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines += new
    return "\n".join(lines) + "\n"


def nodes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [
        (
            str(n.get("InstanceGroupName", "")),
            str(n.get("InstanceId", "")),
            str(n.get("InstanceStatus", {}).get("Status", "")),
            str(n.get("InstanceType", "")),
            json_default(n["LaunchTime"]) if n.get("LaunchTime") else "-",
        )
        for n in nodes
    ]
    return table(rows, ("group", "instance id", "status", "type", "launch time"))


# --- side effects -----------------------------------------------------------------------------------------------


def load(args: argparse.Namespace) -> ClusterConfig:
    from hyperjob.aws.cluster_config import load_cluster_config
    from hyperjob.config.load import ConfigError

    if not args.config.is_file():
        raise CliError(f"{args.config}: no such file (write one with `hyperjob cluster init`)")
    try:
        return load_cluster_config(args.config, args.overrides)
    except ConfigError as e:
        raise CliError("\n".join(e.lines()), EXIT_USAGE) from None


def confirm(lines: list[str], question: str, yes: bool) -> None:
    """Show what will happen and ask; without a terminal to ask on, only --yes proceeds."""
    if yes:
        return
    for line in lines:
        print(line)
    if not sys.stdin.isatty():
        raise CliError(f"stdin is not a terminal, so nothing can be confirmed: pass --yes to {question}")
    answer = input(f"{question}? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("not confirmed: nothing done", EXIT_RUN_FAILED)


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Write through a temporary file in the same directory and rename: a reader never sees half a file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _described(cfg: ClusterConfig) -> dict[str, Any]:
    from hyperjob.aws.cluster import describe

    description = describe(cfg)
    if description is None:
        raise CliError(f"no cluster named {cfg.cluster_name}", EXIT_RUN_FAILED)
    return description


# --- subcommands ------------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from hyperjob.resources import shipped_dir

    out: Path = args.output
    if out.exists() and not args.force:
        raise CliError(f"{out} exists: pass --force to overwrite it, or --output another file")
    out.write_text((shipped_dir("examples") / EXAMPLE_NAME).read_text())
    print(f"wrote {out}: edit cluster_name, region and network, then `hyperjob cluster validate {out}`")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from hyperjob.aws.preflight import preflight
    from hyperjob.aws.stack import stack_outputs

    cfg = load(args)
    outputs: dict[str, str] | None = {}
    if cfg.network.mode == "stack":
        outputs = stack_outputs(cfg)
    if outputs is None:
        print(f"config ok; stack {cfg.stack_name} does not exist yet: the network checks run once it does")
        return 0
    lines = preflight(cfg, outputs)
    for line in lines:
        print(line)
    if any(not line.startswith(NOTE) for line in lines):  # a note says a check was skipped: not a problem
        return EXIT_RUN_FAILED
    print("ok")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from hyperjob.aws.cluster import create_cluster, wait_in_service
    from hyperjob.aws.stack import deploy_stack
    from hyperjob.aws.upload import upload_lifecycle

    cfg = load(args)
    confirm(plan_lines(cfg), "create these", args.yes)
    outputs = deploy_stack(cfg)
    uploaded = upload_lifecycle(cfg, outputs)
    if not uploaded.uploaded and not uploaded.removed:
        print("lifecycle scripts: uploaded nothing")
    created = create_cluster(cfg, outputs, uploaded.s3_uri)
    if args.no_wait:
        print(f"not waiting: `hyperjob cluster status {args.config}` shows progress")
        return 0
    wait_in_service(cfg, timeout_s=args.timeout)
    print(f"cluster {cfg.cluster_name} InService ({created.arn})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hyperjob.aws.cluster import log_group, progress_line

    cfg = load(args)
    description = _described(cfg)
    failed = description.get("ClusterStatus") == "Failed"
    if args.json:
        print(json.dumps(description, indent=2, default=json_default))
        return EXIT_RUN_FAILED if failed else 0
    print(f"cluster {cfg.cluster_name} ({description.get('ClusterArn', '')})")
    print(progress_line(description))
    if failed:
        print(f"failure: {description.get('FailureMessage') or 'no FailureMessage given'}")
        print(f"lifecycle script logs: CloudWatch log group {log_group(cfg.cluster_name, description['ClusterArn'])}")
        return EXIT_RUN_FAILED
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    from hyperjob.aws.cluster import list_nodes

    cfg = load(args)
    nodes = list_nodes(cfg)
    if args.json:
        print(json.dumps(nodes, indent=2, default=json_default))
    elif nodes:
        print(nodes_table(nodes))
    else:
        print(f"cluster {cfg.cluster_name} has no nodes")
    return 0


def cmd_ssh_config(args: argparse.Namespace) -> int:
    from hyperjob.aws.cluster import list_nodes
    from hyperjob.aws.ssh import ssh_config

    cfg = load(args)
    try:
        text = ssh_config(cfg, _described(cfg), list_nodes(cfg))
    except ValueError as e:
        raise CliError(str(e), EXIT_RUN_FAILED) from None
    if not args.write:
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    path = Path.home() / SSH_CONFIG
    old = path.read_text() if path.is_file() else ""
    write_atomically(path, replace_block(old, cfg.cluster_name, text))
    print(f"wrote the {cfg.cluster_name} block into {path}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from hyperjob.aws.cluster import delete_cluster
    from hyperjob.aws.stack import delete_stack

    cfg = load(args)
    with_stack = cfg.network.mode == "stack" and not args.keep_stack
    what = [f"delete cluster {cfg.cluster_name}" + (f" and stack {cfg.stack_name} (its bucket emptied)"
                                                    if with_stack else "")]  # fmt: skip
    confirm(what, "delete", args.yes)
    delete_cluster(cfg)
    if with_stack:
        delete_stack(cfg)
    return 0
