"""A hostile string in any config field is rejected cleanly, or reaches its reader unchanged; nothing it holds executes.

What this file proves, for every string field of the config (FIELDS):

* Rejected: validation fails with a ConfigError that names the key, one printable line per problem; no other
  exception (a RuntimeError traceback from `Path.expanduser` on `~nobody/x` was such a bug).
* Accepted: every rendered stage script runs under real bash with a recorder in place of Python, once with the local
  executor and once (in the fixed-list test) under a fake srun. The recorder must be exec'd at exactly the configured
  interpreter path, with the stage's argv, and read the exact value back from config.yaml (and from its environment,
  for environment.env); the fake srun must get the exact container image. A marker file proves no injected command ran.
* Slurm (tests marked `slurm`): the rendered `#SBATCH` lines of accepted values (job name, partition, account, qos,
  time, a `--comment` through cluster.sbatch_extra, the log path under workdir) are read by the real sbatch as exactly
  those values, and the controller keeps them for the (held, then cancelled) job: the time limit as the minutes meant,
  the log path as the file hyperjob expects (account names folded to lower case; without accounting, no QOS). The
  partition stays the cluster's own, since sbatch refuses any other.

The values come from three places: DANGEROUS, a fixed list of known-dangerous strings tried in every field on every
run (so a bug like the `~` one fails every time, not when hypothesis happens to draw it); hypothesis text full of
shell metacharacters and injection fragments; and, for the fields whose validation rejects all of those, values drawn
from the field's own pattern or validator (ACCEPTED), so that the strongest values validation lets through are run too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_slurm import SlurmCluster
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from hyperjob.backends.base import TRAIN_GROUP
from hyperjob.backends.catalogue import CATALOGUE
from hyperjob.config.load import ConfigError, load_config
from hyperjob.config.models import HyperjobConfig
from hyperjob.paths import RunPaths
from hyperjob.plan.planner import Plan, make_plan
from hyperjob.plan.resources import slurm_minutes
from hyperjob.schedule.run import write_run_dir
from hyperjob.stage_table import spec

REPO = Path(__file__).resolve().parent.parent
PWNED = "hyperjob-pwned"
# Fragments that would create the marker file if any of them were ever executed.
INJECTIONS = [
    f"$(touch {PWNED})",
    f"`touch {PWNED}`",
    f"; touch {PWNED}",
    f"' ; touch {PWNED} ; '",
    f'" ; touch {PWNED} #',
]
hostile_text = st.builds(
    lambda a, inj, b: a + inj + b,
    st.text(alphabet="ab '\"$`;&|<>*?~!#\\%{}()\n\t=", max_size=12),
    st.sampled_from(INJECTIONS),
    st.text(alphabet="xyz $'\"\\\n", max_size=6),
)

# Known-dangerous strings, tried in every field on every run.
DANGEROUS = [
    "~nobody-here/x", "~nobody-here", "~", "~/x", "~a\nb/x",  # Path.expanduser: unknown user, this user's home
    "-rf", "--help", "-",  # read as an option
    "$HOME", "${IFS}", "$(id)", "`id`", "a;b", "a|b&c", "*", "{a,b}",  # expansions, separators, globs
    "%j", "%x", "%%", "50%",  # Slurm filename patterns
    "\\", "a\\b", "a\\", "\\'", '\\"', "\\n",  # backslash: an escape to bash in double quotes, and to sbatch
    "'", '"', "it's", 'say "hi"', "'\"'", "#x", "a #b", " a b ",  # quotes, a comment start, spaces
    "a\nb", "\n", "a\rb", "a\vb", "a\fb", "a\tb", "a\x1bb",  # line breaks and control characters
    "a\u2028b", "a\u2029b", "a\u0085b", "a\u00a0b", "a\u200bb",  # unicode line/paragraph separators, NEL, spaces
    "é中😀",  # non-ASCII printable text
    *INJECTIONS,
    f"\\'; touch {PWNED} #", f'\\"; touch {PWNED} #', f"a\\\n$(touch {PWNED})", f"'$(touch {PWNED})'",
]  # fmt: skip

# Every string field (dotted key) of the config.
FIELDS = [
    "name", "backend", "workdir", "model.id", "model.revision", "model.token_env", "model.token_file",
    "dataset.id", "dataset.path", "dataset.split", "cluster.partition", "cluster.account", "cluster.qos",
    "cluster.time", "cluster.instance_type", "cluster.sbatch_extra", "cluster.container_image",
    "lora.target_modules", "evaluate.prompts", "environment.python", "environment.train_python",
    "environment.env", "merge.max_shard_size", "merge.max_memory",
]  # fmt: skip
PATH_FIELDS = ("workdir", "model.token_file", "dataset.path")  # resolved against the config's directory, ~ expanded
INTERPRETERS = ("environment.python", "environment.train_python")

RECORDER = """#!{python} -IS
import json, os, sys
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
    config = f.read()
row = {{"argv": sys.argv, "stage": os.environ.get("HYPERJOB_STAGE"), "env": os.environ.get("HJ_USER_VALUE"),
       "config": config}}
with open(os.environ["HJ_RECORD"], "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\\n")
"""
# Stands in for srun on PATH: like srun, reads options up to the first word that is not one, records them, and
# executes the rest (a relative command from the current directory, a bare name from PATH).
FAKE_SRUN = """#!{python} -IS
import json, os, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["HJ_SRUN_RECORD"], "a", encoding="utf-8") as f:
    f.write(json.dumps(options) + "\\n")
os.execvp(args[0], args)
"""


# --- Values validation accepts, from the field's own rule --------------------------------------------------------


def pattern_of(key: str) -> str:
    """The regex pydantic enforces on a field (`Field(pattern=...)`), read from the model itself."""
    model: type[BaseModel] = HyperjobConfig
    *sections, leaf = key.split(".")
    for section in sections:
        annotation = model.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), key
        model = annotation
    patterns = [p for meta in model.model_fields[leaf].metadata if (p := getattr(meta, "pattern", None))]
    assert len(patterns) == 1, f"{key}: expected one pattern constraint, found {patterns}"
    return patterns[0]


def _module_name() -> st.SearchStrategy[str]:
    # lora.target_modules is checked by code, not a regex: after removing '_' and '.', the name must be non-empty and
    # str.isalnum(), which any Unicode letter or digit (categories L*, N*) passes. So: those characters, '_' and '.',
    # with at least one letter or digit.
    alnum = st.characters(categories=("L", "N"))
    part = st.text(st.one_of(alnum, st.sampled_from("_.")), max_size=8)
    return st.builds(lambda a, b, c: a + b + c, part, alnum, part)


# Fields that every DANGEROUS and hostile_text value fails, with the strongest values their validation accepts.
# (backend is one too, but its only value accepted with this config's cpu instance is the base config's own "cpu".)
REGEX_FIELDS = (
    "name", "model.token_env", "cluster.partition", "cluster.account", "cluster.qos", "cluster.time",
    "merge.max_shard_size", "merge.max_memory",
)  # fmt: skip
ACCEPTED: dict[str, st.SearchStrategy[str]] = {
    **{key: st.from_regex(pattern_of(key), fullmatch=True) for key in REGEX_FIELDS},
    # Checked by the planner against the instance catalogue, not a regex: every cpu instance, in both spellings.
    "cluster.instance_type": st.sampled_from(
        [prefix + name for name, inst in CATALOGUE.items() if inst.accelerator == "cpu" for prefix in ("", "ml.")]
    ),
    "lora.target_modules": _module_name(),
}

# Printable text (what validation lets into an #SBATCH line): runs of the characters quoting must handle, between
# runs of any letters, marks, digits, punctuation and symbols (about half the characters are of the first kind).
printable_text = st.lists(
    st.one_of(
        st.text(st.sampled_from(" '\"\\#$%`;&|<>*?~!{}()=,-j"), min_size=1, max_size=3),
        st.text(st.characters(exclude_categories=("C", "Z")), min_size=1, max_size=3),
    ),
    max_size=8,
).map("".join)


# --- Placing values and reading them back --------------------------------------------------------------------------


def base_config(tmp: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data["workdir"] = str(tmp / "work")
    data["environment"] = {"python": str(tmp / "recorder")}
    return data


def place(data: dict[str, Any], key: str, value: str) -> None:
    section, _, leaf = key.partition(".")
    if key == "cluster.sbatch_extra":
        data["cluster"][leaf] = [f"--comment={value}"]
    elif key in ("lora.target_modules", "evaluate.prompts"):
        data[section][leaf] = [value]
    elif key == "environment.env":
        data["environment"]["env"] = {"HJ_USER_VALUE": value}
    elif key == "dataset.id":
        data["dataset"].pop("path", None)  # exactly one source
        data["dataset"]["id"] = value
    elif leaf:
        data.setdefault(section, {})[leaf] = value
    else:
        data[key] = value


def read_key(cfg: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _looks_local(model_id: str) -> bool:
    """The documented rule: a model.id that is a path (resolved like one) rather than a hub id."""
    return model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..")


def expected_stored(key: str, value: str, base: Path) -> Any:
    """What config.yaml must hold for `value` placed at `key`, with the config file and HOME (`base/home`) in `base`."""
    if key in PATH_FIELDS or (key == "model.id" and _looks_local(value)):
        if value == "~" or value.startswith("~/"):
            value = str(base / "home") + value[1:]
        path = Path(value)
        return str(path if path.is_absolute() else (base / path).resolve())
    if key in INTERPRETERS and value.startswith(("./", "../")):
        return str((base / value).resolve())
    if key == "cluster.sbatch_extra":
        return [f"--comment={value}"]
    if key in ("lora.target_modules", "evaluate.prompts"):
        return [value]
    if key == "environment.env":
        return {"HJ_USER_VALUE": value}
    return value


def load(tmp: Path, data: dict[str, Any]) -> tuple[HyperjobConfig, Plan]:
    """Validate and plan as `hyperjob submit` does, with HOME inside the test's directory (so `~` stays in it)."""
    cfg_path = tmp / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data), encoding="utf-8")  # non-ASCII escaped: PyYAML can't round-trip U+2028
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp / "home"))
        cfg = load_config(cfg_path, check_inputs=False)
        return cfg, make_plan(cfg)


def assert_clean_rejection(err: ConfigError, key: str, value: str) -> None:
    lines = [f"{k}: {msg}" if k else msg for k, msg in err.problems]
    # A value-level check reports at its key; the whole-config control-character check names the key first thing.
    assert any(k == key or (not k and msg.startswith(f"{key}:")) for k, msg in err.problems), (
        f"{key}={value!r} rejected without naming the key: {lines}"
    )
    for line in lines:
        assert line.isprintable(), f"{key}={value!r}: the error must be one printable line, got {line!r}"


def validate_each(tmp: Path, values: Mapping[str, str]) -> dict[str, str]:
    """Each value alone in the base config: a clean ConfigError, or accepted. Any other exception fails the test."""
    accepted = {}
    check_dir = tmp / "validate"
    (check_dir / "home").mkdir(parents=True, exist_ok=True)
    for key, value in values.items():
        data = base_config(check_dir)
        place(data, key, value)
        try:
            load(check_dir, data)
        except ConfigError as e:
            assert_clean_rejection(e, key, value)
            continue
        accepted[key] = value
    return accepted


def install_recorder(interpreter: str, tmp: Path, run_dir: Path, bin_dir: Path) -> str:
    """Put the recorder where bash finds `interpreter`; return the path bash will exec it by (its argv[0])."""
    if interpreter.startswith("/"):
        path, argv0 = Path(interpreter), interpreter
    elif "/" in interpreter:  # relative: the scripts `cd "$RUN_DIR"` first
        path, argv0 = run_dir / interpreter, interpreter
    else:  # a bare name is looked up in PATH
        path = bin_dir / interpreter
        argv0 = str(path)
    assert path.resolve().is_relative_to(tmp.resolve()), f"test harness: {interpreter!r} leaves the test's directory"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.format(python=sys.executable))
    path.chmod(0o755)
    return argv0


def run_pipeline(tmp: Path, values: Mapping[str, str], *, srun: bool) -> None:
    """All `values` placed together; every stage script runs under bash; the recorder sees exactly what was meant."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True)
    (tmp / "home").mkdir()
    data = base_config(tmp)
    for key, value in values.items():
        place(data, key, value)
    try:
        cfg, plan = load(tmp, data)
    except ConfigError as e:
        pytest.fail(f"accepted one at a time but not together: {sorted(values)}: {e}")
    assert cfg.workdir.resolve().is_relative_to(tmp.resolve()), f"test harness: workdir {cfg.workdir} outside {tmp}"
    run_dir = cfg.workdir / "runs" / "r"
    write_run_dir(cfg, plan, run_dir, scheduler=None)
    argv0 = {}
    for stage in plan.stages:  # the training stack's stages run with train_python, when set
        train = spec(stage).group == TRAIN_GROUP and cfg.environment.train_python
        interpreter = cfg.environment.train_python if train else cfg.environment.python
        argv0[stage] = install_recorder(str(interpreter), tmp, run_dir, bin_dir)
    record, srun_record = tmp / "record.jsonl", tmp / "srun.record"
    env = {
        **os.environ,
        "HOME": str(tmp / "home"),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HYPERJOB_EXECUTOR": "slurm" if srun else "local",
        "HJ_RECORD": str(record),
        "HJ_SRUN_RECORD": str(srun_record),
    }
    if srun:
        (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
        (bin_dir / "srun").chmod(0o755)
    failed = []
    for script in sorted(RunPaths(run_dir).scripts.iterdir()):
        proc = subprocess.run(["bash", str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            failed.append(f"{script.name} exited {proc.returncode}:\n{proc.stderr}")
    injected = [*tmp.rglob(PWNED), *[p for p in [REPO / PWNED] if p.exists()]]
    assert not injected, f"injection executed for {dict(values)!r}: {injected}"
    assert not failed, f"for {dict(values)!r}: " + "\n".join(failed)

    rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert [row["stage"] for row in rows] == list(plan.stages)
    for row in rows:
        stage = row["stage"]
        # A relative interpreter is exec'd from the run dir: compare paths from there.
        seen = os.path.join(run_dir, row["argv"][0])
        assert seen == os.path.join(run_dir, argv0[stage]), f"{stage}: interpreter exec'd as {row['argv'][0]!r}"
        assert row["argv"][-4:] == ["-m", spec(stage).entry, "--run-dir", str(run_dir)]
        stored = yaml.safe_load(row["config"])
        for key, value in values.items():
            assert read_key(stored, key) == expected_stored(key, value, tmp), f"{stage}: {key}={value!r} changed"
        assert row["env"] == values.get("environment.env"), f"{stage}: HJ_USER_VALUE={row['env']!r}"
    if srun:
        calls = [json.loads(line) for line in srun_record.read_text(encoding="utf-8").splitlines()]
        assert len(calls) == len(plan.stages), calls
        image = values.get("cluster.container_image")
        want = [f"--container-image={image}", f"--container-mounts={cfg.workdir}:{cfg.workdir}"] if image else []
        for opts in calls:
            assert [o for o in opts if o.startswith("--container-")] == want, opts


# --- Tests ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", DANGEROUS, ids=ascii)
def test_dangerous_string_in_every_field(tmp_path: Path, value: str) -> None:
    """Every field gets the same dangerous string: each rejects it cleanly or passes it on untouched.

    The accepted fields then run together: once with the local executor and the dataset from a file, once under a
    fake srun with the dataset from the hub (dataset.path and dataset.id exclude each other).
    """
    accepted = validate_each(tmp_path, dict.fromkeys(FIELDS, value))
    local = {k: v for k, v in accepted.items() if k != "dataset.id"}
    hub = {k: v for k, v in accepted.items() if k != "dataset.path"}
    run_pipeline(tmp_path / "local", local, srun=False)
    run_pipeline(tmp_path / "srun", hub, srun=True)


@pytest.mark.parametrize("key", FIELDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=hostile_text)
def test_hostile_string(tmp_path_factory: pytest.TempPathFactory, key: str, value: str) -> None:
    tmp = tmp_path_factory.mktemp("hostile")
    if validate_each(tmp, {key: value}):
        run_pipeline(tmp / "local", {key: value}, srun=False)
        if key == "cluster.container_image":  # only srun sees it
            run_pipeline(tmp / "srun", {key: value}, srun=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries(ACCEPTED))
def test_strongest_accepted_values(tmp_path_factory: pytest.TempPathFactory, values: dict[str, str]) -> None:
    """Values drawn from each field's own validation rule are accepted, and survive bash unchanged (all at once)."""
    tmp = tmp_path_factory.mktemp("accepted")
    accepted = validate_each(tmp, values)
    assert accepted == values, f"drawn from their own rule, yet rejected: {sorted(set(values) - set(accepted))}"
    run_pipeline(tmp / "local", values, srun=False)


# --- Real sbatch ----------------------------------------------------------------------------------------------------


def slurm_expand(pattern: str, job_id: str) -> str:
    """A log path as slurmstepd opens it: `%%` -> `%`, `%j` -> the job id; any other use of `%` or `\\` is an error."""
    assert "\\" not in pattern, f"a backslash turns off Slurm's filename patterns and is dropped: {pattern!r}"

    def one(m: re.Match[str]) -> str:
        assert m[1] in ("%", "j"), f"unescaped Slurm filename pattern %{m[1]} in {pattern!r}"
        return "%" if m[1] == "%" else job_id

    return re.sub(r"%(.?)", one, pattern)


def submit_held(cluster: SlurmCluster, script: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """sbatch the script on hold; return sbatch's own reading of its options and the controller's record of the job."""
    env = {**os.environ, **cluster.env}
    proc = subprocess.run(
        ["sbatch", "--hold", "--parsable", "-v", str(script)],
        cwd=script.parent, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"sbatch rejected {script}:\n{proc.stderr}\n{script.read_text()}"
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout
    try:
        # `sbatch -v` lists the options it read, one `sbatch: <name>  : <value>` line each.
        defined = proc.stderr.split("end of defined options")[0]
        options = dict(re.findall(r"^sbatch: (\S+) *: (.*)$", defined, re.MULTILINE))
        # squeue --json (Slurm 22.05) ignores -j: pick the job from the whole queue.
        queue = subprocess.run(["squeue", "--json"], env=env, capture_output=True, text=True, timeout=60, check=True)
        jobs = [j for j in json.loads(queue.stdout)["jobs"] if str(j["job_id"]) == job_id]
        assert len(jobs) == 1, f"job {job_id} not in squeue --json"
        return options, {**jobs[0], "job_id": job_id}
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=60, check=False)


def check_header(cluster: SlurmCluster, tmp: Path, values: Mapping[str, str]) -> None:
    """Render with `values`, submit the train stage's script on hold (it keeps cluster.*; the light stages have
    their own time defaults), and compare what Slurm read with what was meant."""
    (tmp / "home").mkdir(parents=True)
    data = base_config(tmp)
    for key, value in values.items():
        place(data, key, value)
    cfg, plan = load(tmp, data)
    run_dir = cfg.workdir / "runs" / "r"
    write_run_dir(cfg, plan, run_dir, scheduler=None)
    index, stage = 2, plan.stages[1]
    assert stage == "train"
    options, job = submit_held(cluster, RunPaths(run_dir).script(index, stage))
    meant = {
        "job-name": f"{values.get('name', data['name'])}.{stage}",
        "partition": values.get("cluster.partition"),
        "account": values.get("cluster.account"),
        "qos": values.get("cluster.qos"),
        "comment": values.get("cluster.sbatch_extra"),
        "time": values.get("cluster.time", data["cluster"]["time"]),
    }
    for option in ("job-name", "partition", "account", "qos", "comment"):  # sbatch's own reading of the #SBATCH lines
        if meant[option] is not None:
            assert options.get(option) == meant[option], f"sbatch read --{option}={options.get(option)!r}"
    # The controller's record. Without accounting it keeps no QOS; it folds account names to lower case.
    assert job["name"] == meant["job-name"]
    assert job["partition"] == (meant["partition"] or cluster.partition)
    if meant["account"] is not None:
        assert job["account"] == meant["account"].lower()
    if meant["comment"] is not None:
        assert job["comment"] == meant["comment"]
    time = str(meant["time"])
    assert job["time_limit"] == slurm_minutes(time), f"--time={time} became {job['time_limit']} minutes"
    log = RunPaths(run_dir).logs / RunPaths.log_name(index, stage, job["job_id"])
    assert slurm_expand(job["standard_output"], job["job_id"]) == str(log)


@pytest.mark.slurm
# No shrinking: every step would be another real submission, and a failing example is readable as drawn.
@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=ACCEPTED["name"], account=ACCEPTED["cluster.account"], qos=ACCEPTED["cluster.qos"],
    time=ACCEPTED["cluster.time"], comment=printable_text,
    folder=printable_text.filter(lambda s: "/" not in s and "\\" not in s),  # one folder; workdir refuses a backslash
)  # fmt: skip
def test_sbatch_reads_header_values(
    slurm_cluster: SlurmCluster,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    account: str,
    qos: str,
    time: str,
    comment: str,
    folder: str,
) -> None:
    """Accepted header values reach Slurm exactly. The partition stays the cluster's own: sbatch refuses any other."""
    tmp = tmp_path_factory.mktemp("sbatch")
    values = {
        "name": name, "cluster.partition": slurm_cluster.partition, "cluster.account": account, "cluster.qos": qos,
        "cluster.time": time, "cluster.sbatch_extra": comment, "workdir": f"{tmp}/w{folder}",
    }  # fmt: skip
    check_header(slurm_cluster, tmp, values)


@pytest.mark.slurm
@pytest.mark.parametrize("value", [v for v in DANGEROUS if v.isprintable()], ids=ascii)
def test_sbatch_reads_dangerous_values(slurm_cluster: SlurmCluster, tmp_path: Path, value: str) -> None:
    """The fixed dangerous strings in the free-text header values: a --comment and the workdir of the log path."""
    accepted = validate_each(tmp_path, {"cluster.sbatch_extra": value, "workdir": f"{tmp_path}/w/{value}"})
    assert "cluster.sbatch_extra" in accepted  # any printable --comment is (a workdir is not with a backslash)
    check_header(slurm_cluster, tmp_path / "run", accepted)


# Every --time form Slurm reads, its extremes, and look-alikes: validation refuses each, or sbatch reads what was meant.
TIMES = [
    "5", "005", "5:99", "1:02:03", "999:59:59", "1-0", "1-2:3", "1-2:03:04", "9999-999:99:99", "0", "0-0:0:0",
    "UNLIMITED", "INFINITE", "24856-0", "99999999-1", "1000", "1:2", "1-", "-1", "1:2:3:4", "unlimited", " 5",
    "\u0661", "\uff11:\uff10\uff10", "\u0663-\u0663",  # digits of other scripts: sbatch knows only 0-9
]  # fmt: skip


@pytest.mark.slurm
@pytest.mark.parametrize("time", TIMES, ids=ascii)
def test_sbatch_reads_time(slurm_cluster: SlurmCluster, tmp_path: Path, time: str) -> None:
    if validate_each(tmp_path, {"cluster.time": time}):
        check_header(slurm_cluster, tmp_path / "run", {"cluster.time": time})
