"""The real hub path, end to end through the CLI, against a loopback hub (tests/hub_server.py).

What this file proves, with `huggingface_hub.snapshot_download` itself doing the HTTP (nothing faked in-process):

- The hub token reaches the hub, and nowhere else. A run whose download stage fetches a private model from a
  server that refuses any request without `Authorization: Bearer <token>` completes (download, then train),
  and the token, raw or base64-, hex- or URL-encoded, is in none of: any file under the test's tmp dir (run
  directory: scripts, logs, manifest, outcomes, config.yaml; the workdir's model cache; HF_HOME; and HOME and
  TMPDIR, pointed there so nothing the run writes escapes the scan), the CLI's stdout/stderr, the argv of any
  process (a stand-in `environment.python` logs its argv and its parent's; a poller reads every process's
  /proc/PID/cmdline while the run lasts), or any part of a request but its Authorization header. Both ways
  users give the token are covered: `model.token_env` naming a variable, and `model.token_file`.
- Hub failures become one line naming the model and the cause, from the exception classes huggingface_hub
  really raises for the hub's real answers (401, 404 RepoNotFound, 403 GatedRepo, 404 RevisionNotFound, no
  hub at all): no traceback, no token, nothing left in the model cache.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import yaml
from hub_server import FakeHub, HubRepo, files_of

from hyperjob.paths import model_slug
from hyperjob.stages.common import COMPLETE_MARKER

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "tiny-org/tiny-llama"
TOKEN_VAR = "HYPERJOB_TEST_HUB_TOKEN"  # not HF_TOKEN: huggingface_hub must get the token from hyperjob, not by itself
_HUB_VARS = ("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "TRANSFORMERS_")


def new_token() -> str:
    """A token shaped like a real one (`hf_` + 34 letters and digits), fresh per test so no other run holds it."""
    alphabet = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(34))


def encodings(token: str) -> dict[str, bytes]:
    """The token as bytes, and as it would look base64- (any alignment), hex- or URL-encoded inside other bytes."""
    raw = token.encode()
    out = {"raw": raw, "hex": raw.hex().encode(), "url": quote(token, safe="").encode()}
    out["url+"] = quote_plus(token).encode()
    for k in range(3):  # k bytes before the token shift its base64 alphabet; keep the chars only it determines
        first, last = -(-4 * k // 3), (8 * (k + len(raw))) // 6
        out[f"base64@{k}"] = base64.b64encode(b"\0" * k + raw)[first:last]
        out[f"base64url@{k}"] = base64.urlsafe_b64encode(b"\0" * k + raw)[first:last]
    return out


def found(token: str, data: bytes) -> list[str]:
    """Which encodings of the token `data` holds."""
    return [name for name, needle in encodings(token).items() if needle in data]


def leaks_in_files(token: str, root: Path, skip: Path | None = None) -> dict[str, list[str]]:
    """Every file under `root` (but `skip`, the token file) that holds the token in some encoding."""
    hits = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and (skip is None or not path.is_relative_to(skip)):
            names = found(token, path.read_bytes())
            if names:
                hits[str(path.relative_to(root))] = names
    return hits


@contextmanager
def cmdline_poller(interval: float = 0.05) -> Iterator[dict[int, bytes]]:
    """Every process's argv (/proc/PID/cmdline) seen while the block runs, by pid (the newest per pid).

    Catches the processes no wrapper sees: torchrun's workers are started with torchrun's own sys.executable.
    """
    seen: dict[int, bytes] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            cmdline = f.read()
                    except OSError:
                        continue  # gone meanwhile, or not ours to read
                    if cmdline:
                        seen[int(entry.name)] = cmdline
            stop.wait(interval)

    thread = threading.Thread(target=poll, name="cmdline-poller", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def argv_logging_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in interpreter for `environment.python`: appends its argv and its parent's to a log, then runs the
    real one. Returns (the script, its log)."""
    log = tmp_path / "argv.log"
    script = tmp_path / "bin" / "python"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/bash\n"
        "{ printf 'argv:'; printf ' %q' \"$0\" \"$@\"; printf '\\nparent:'; tr '\\0' ' ' </proc/$PPID/cmdline;"
        f" printf '\\n'; }} >>{quote_shell(log)}\n"
        f'exec {quote_shell(Path(sys.executable))} "$@"\n'
    )
    script.chmod(0o755)
    return script, log


def quote_shell(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def hub_env(tmp_path: Path, endpoint: str, extra: Mapping[str, str] = ()) -> dict[str, str]:
    """The CLI's environment: no inherited hub settings or tokens, HF_ENDPOINT on the loopback hub, and HOME,
    TMPDIR, HF_HOME and the XDG cache inside tmp_path, so whatever the run writes is in the scanned tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HUB_VARS)}
    home = tmp_path / "home"
    for d in (home, tmp_path / "tmp"):
        d.mkdir(exist_ok=True)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    env.update(extra)
    return env


def hub_config(tmp_path: Path, stages: list[str], model: Mapping[str, object], python: Path | None = None) -> Path:
    """examples/tiny-cpu.yaml with a hub model id, as few training steps as make a checkpoint, and `stages`."""
    data = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    data.update(workdir=str(tmp_path / "work"), stages=stages)
    data["model"] = {"id": REPO_ID, **model}
    data["dataset"]["path"] = str(REPO / "examples" / "data" / "dolly-tiny.jsonl")
    data["training"].update(max_steps=2, save_steps=2, logging_steps=1)
    if python is not None:
        data["environment"] = {"python": str(python)}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def submit(config: Path, env: Mapping[str, str], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hyperjob", "submit", str(config), "--scheduler", "local", "--wait", "--poll", "0.5"],
        capture_output=True, timeout=timeout, env=dict(env), cwd=config.parent,
    )  # fmt: skip


def only_run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    return run_dir


@pytest.fixture
def tiny_repo(tiny_model_dir: Path) -> HubRepo:
    """The built-in tiny Llama as a hub repo (without hyperjob's completion marker, which the hub never has)."""
    return HubRepo(files_of(tiny_model_dir, skip=(COMPLETE_MARKER,)))


# ---------------------------------------------------------------- the token goes to the hub and nowhere else


@pytest.mark.slow
@pytest.mark.parametrize("given_by", ["token_env", "token_file"])
def test_hub_token_reaches_the_hub_and_nowhere_else(tmp_path: Path, tiny_repo: HubRepo, given_by: str) -> None:
    """A private model downloaded for real, then trained on: the token is sent, as a Bearer header, and is then
    in no file, output, argv or other request part. The server refuses requests without it, and the test checks
    every request carried it, so a run that never used the token cannot pass."""
    token = new_token()
    token_dir = tmp_path / "secret"  # the one place the token may be on disk (token_file), skipped by the scan
    token_dir.mkdir()
    if given_by == "token_env":
        model: dict[str, object] = {"token_env": TOKEN_VAR}
        extra = {TOKEN_VAR: token}
    else:
        (token_dir / "token").write_text(token + "\n")
        model, extra = {"token_env": None, "token_file": str(token_dir / "token")}, {}
    python, argv_log = argv_logging_python(tmp_path)
    config = hub_config(tmp_path, ["download", "train"], model, python)

    with FakeHub(token, {REPO_ID: tiny_repo}) as hub, cmdline_poller() as cmdlines:
        proc = submit(config, hub_env(tmp_path, hub.url, extra))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output.decode(errors="replace")

    # The hub path really ran, with the token: every request authenticated, the model and a checkpoint made.
    requests = hub.requests
    paths = {r.path.split("?")[0] for r in requests}
    commit = tiny_repo.commit
    assert f"/api/models/{REPO_ID}/revision/main" in paths
    assert {f"/{REPO_ID}/resolve/{commit}/{name}" for name in ("config.json", "model.safetensors")} <= paths
    assert {r.authorization for r in requests} == {f"Bearer {token}"}
    model_dir = tmp_path / "work" / "models" / "tiny-org--tiny-llama"
    assert (model_dir / COMPLETE_MARKER).is_file() and (model_dir / "model.safetensors").is_file()
    run_dir = only_run_dir(tmp_path)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [("download", "COMPLETED"), ("train", "COMPLETED")]
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()

    # ... and nowhere else: not in a request's URL or other headers,
    for r in requests:
        other = r.path + "".join(f"{k}: {v}\n" for k, v in r.headers if k.lower() != "authorization")
        assert not found(token, other.encode()), f"the token went to the hub outside Authorization: {r}"
    # not on disk (run dir, model cache, HF_HOME, HOME, TMPDIR, the argv log),
    leaks = leaks_in_files(token, tmp_path, skip=token_dir)
    assert not leaks, f"the hub token leaked into {leaks}"
    # not in what the CLI printed,
    assert not found(token, output), output.decode(errors="replace")
    # not in any process's argv: the stages' own (through the stand-in python) and every other's.
    logged = argv_log.read_text()
    assert "-m hyperjob.stages.download --run-dir" in logged and "-m torch.distributed.run" in logged, logged
    assert not found(token, logged.encode())
    workers = [c for c in cmdlines.values() if b"-m\0hyperjob.stages.train\0" in c and b"torch.distributed" not in c]
    assert len(workers) >= 2, f"the poller saw {len(workers)} of the 2 train workers: it cannot vouch for their argv"
    assert not [c for c in cmdlines.values() if found(token, c)]


# ---------------------------------------------------------------- hub failures, as the hub really answers


FAILURES = {  # case -> the cause the user reads
    "wrong-token": "not found or no access (HTTP 401): check the id and the token",
    "unknown-repo": "not found or no access (HTTP 404): check the id and the token",
    "gated": "gated repository: accept its licence on the hub and set a token with access",
    "unknown-revision": "revision not found",
    "no-hub": "network unreachable or hub offline",
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_hub_failure_is_one_line_without_token(tmp_path: Path, tiny_repo: HubRepo, case: str) -> None:
    """Each failure is produced for real: the hub answers as the Hugging Face Hub does (or is not there), and
    huggingface_hub raises what it raises; the user reads one line naming model, revision and cause."""
    token = new_token()
    hub_token = new_token() if case == "wrong-token" else token  # wrong-token: the hub accepts another one
    repo_id, revision = REPO_ID, "main"
    repos = {REPO_ID: tiny_repo}
    if case == "unknown-repo":
        repo_id = "tiny-org/no-such-model"
    elif case == "gated":
        repos = {REPO_ID: HubRepo(tiny_repo.files, gated=True)}
    elif case == "unknown-revision":
        revision = "v9"
    config = hub_config(tmp_path, ["download"], {"id": repo_id, "revision": revision, "token_env": TOKEN_VAR})

    with FakeHub(hub_token, repos) as hub:
        endpoint = hub.url
        if case == "no-hub":
            hub.close()  # nothing listens on the port any more: connection refused
        proc = submit(config, hub_env(tmp_path, endpoint, {TOKEN_VAR: token}))
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 1, output
    assert "run failed at stage download (FAILED)" in output

    run_dir = only_run_dir(tmp_path)
    (log,) = (run_dir / "logs").glob("*download*")
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    shown = f"hyperjob download: error: cannot download model {repo_id!r} (revision {revision!r}): {FAILURES[case]}"
    assert errors == [shown], text
    assert shown in output  # the CLI quotes the stage's last lines
    assert "Traceback" not in text + output
    assert not found(token, (text + output).encode()) and not leaks_in_files(token, tmp_path)
    assert not (tmp_path / "work" / "models" / model_slug(repo_id, revision)).exists()
    if case != "no-hub":  # the answer came from the hub, to the token the run sent
        assert hub.requests and {r.authorization for r in hub.requests} == {f"Bearer {token}"}
