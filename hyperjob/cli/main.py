"""The `hyperjob` command: a few verbs over one config file.

Start-up must stay snappy, so the top-level parser is built from a table of verbs (name, module, one line) and a
verb's module is imported only when that verb is parsed: `hyperjob --help` imports none of them, `hyperjob plan`
only the plan module. Light verbs (plan, render, status, logs, cancel, init, runs, completion, --help) import no
torch or transformers; heavy work happens inside the stage scripts.

Output into a closed pipe (`hyperjob status RUN --json | head -1`) ends quietly with exit code 141 (128 + SIGPIPE),
what a shell reports for a Unix tool killed by SIGPIPE, so `set -o pipefail` scripts still see the truncation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from hyperjob import __version__
from hyperjob.cli.common import EXIT_BROKEN_PIPE, CliError, err

DESCRIPTION = "LoRA fine-tuning of Llama-class models on Slurm (Trainium or NVIDIA GPUs), from one config file."
EPILOG = """\
Start with:
  hyperjob init                           write ./hyperjob.yaml (a tiny CPU run)
  hyperjob plan hyperjob.yaml             check it, see the layout
  hyperjob submit hyperjob.yaml --wait    run it

`hyperjob VERB --help` shows a verb's options; every config value can be overridden with --set KEY=VALUE."""
MAX_WIDTH = 100  # help wider than this is harder to read, whatever the terminal


class Verb(NamedTuple):
    """One row of the verb table; `module` has `add_parsers(sub)` registering this verb (and maybe others)."""

    name: str
    module: str
    help: str


VERBS: tuple[Verb, ...] = (  # one-liners fit 80 columns beside the names: at most 60 characters
    Verb("init", "hyperjob.cli.cmd_init", "write an annotated starter config"),
    Verb("plan", "hyperjob.cli.cmd_plan", "validate a config; show its layout, batch sizes and steps"),
    Verb("render", "hyperjob.cli.cmd_plan", "write a config's stage scripts into a new directory"),
    Verb("submit", "hyperjob.cli.cmd_submit", "render a run directory and queue its stages (Slurm or local)"),
    Verb("runs", "hyperjob.cli.cmd_runs", "list a workdir's runs, newest first, with stage states"),
    Verb("status", "hyperjob.cli.cmd_run", "each stage's job id, state, exit code and log"),
    Verb("logs", "hyperjob.cli.cmd_run", "print (or follow) a stage's log"),
    Verb("cancel", "hyperjob.cli.cmd_run", "cancel every unfinished stage of a run"),
    Verb("resume", "hyperjob.cli.cmd_resume", "redo the failed/cancelled/lost stages of a run, keep the rest"),
    Verb("consolidate", "hyperjob.cli.cmd_checkpoint", "Neuron TP checkpoint -> PEFT adapter (and a merged model)"),
    Verb("merge", "hyperjob.cli.cmd_checkpoint", "merge a LoRA adapter into its base model, streaming"),
    Verb("cluster", "hyperjob.cli.cmd_cluster", "create, check, reach and delete a HyperPod Slurm cluster"),
    Verb("env", "hyperjob.cli.cmd_env", "build the pinned Neuron venv on the shared filesystem"),
    Verb("completion", "hyperjob.cli.cmd_completion", "print a shell completion script (bash or zsh)"),
)


def _width() -> int:
    return min(MAX_WIDTH, shutil.get_terminal_size().columns) - 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wrap descriptions and epilogs to the terminal, paragraph by paragraph.

    Unindented lines are prose and are re-filled; indented lines (examples, listings) are kept as written unless
    wider than the terminal, then wrapped with a hanging indent.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_width(), max_help_position=26)

    def add_argument(self, action: argparse.Action) -> None:
        """argparse indents the verbs one level deeper than it measures them; count that level, or a long verb
        name (consolidate) pushes its help onto the next line."""
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and action.help is not argparse.SUPPRESS:
            longest = max((len(a.metavar or a.dest) for a in action._get_subactions()), default=0)
            needed = longest + self._current_indent + self._indent_increment
            self._action_max_length = max(self._action_max_length, needed)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose.clear()

        for line in text.splitlines():
            if line.strip() and not line[0].isspace():
                prose.append(line.strip())
                if line.rstrip().endswith(":"):  # "example:" heads the indented block after it
                    flush()
            elif len(indent + line) > width:  # an indented line wider than the terminal: wrap, hanging
                flush()
                lead = indent + line[: len(line) - len(line.lstrip())]
                out.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead + "    ",
                                         break_on_hyphens=False, break_long_words=False))  # fmt: skip
            else:
                flush()
                out.append(indent + line if line.strip() else "")
        flush()
        return "\n".join(out)


class _LazyVerbParser(argparse.ArgumentParser):
    """A verb's parser that gets its arguments from the verb's module the first time it parses."""

    verb: Verb
    subparsers: Any  # the subparsers action this placeholder belongs to
    siblings: dict[str, _LazyVerbParser]  # every verb's placeholder, by name
    loaded: bool = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        load(self)
        return super().parse_known_args(args, namespace)


class _Registrar:
    """Stands in for the subparsers action while a verb module runs `add_parsers(sub)`.

    `add_parser(name)` hands back the verb's existing placeholder, filled in with the module's description and
    epilog (the table owns the one-line help); a name the table lacks still gets a real parser, so nothing a
    module registers is lost (tests/test_cli_polish.py checks that the table and the modules agree).
    """

    def __init__(self, sub: Any, placeholders: dict[str, _LazyVerbParser]) -> None:
        self._sub, self._placeholders = sub, placeholders

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = self._placeholders.get(name)
        if parser is None or parser.loaded:
            kwargs.setdefault("formatter_class", HelpFormatter)
            extra: _LazyVerbParser = self._sub.add_parser(name, **kwargs)
            extra.loaded = True  # built whole by its module: nothing to load
            return extra
        parser.loaded = True
        parser.description = kwargs.get("description") or parser.verb.help
        parser.epilog = kwargs.get("epilog")
        return parser


def load(parser: argparse.ArgumentParser) -> None:
    """Give a lazy verb parser its arguments (and those of the other verbs of its module)."""
    if not isinstance(parser, _LazyVerbParser) or parser.loaded:
        return
    module = importlib.import_module(parser.verb.module)
    module.add_parsers(_Registrar(parser.subparsers, parser.siblings))
    if not parser.loaded:
        raise RuntimeError(f"{parser.verb.module}.add_parsers registered no verb {parser.verb.name!r}")


def build_parser(*, load_all: bool = False) -> argparse.ArgumentParser:
    """The top-level parser; each verb's own arguments arrive when it parses (or now, with `load_all`)."""
    parser = argparse.ArgumentParser(prog="hyperjob", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=f"hyperjob {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs", parser_class=_LazyVerbParser)
    sub.required = True
    placeholders: dict[str, _LazyVerbParser] = {}
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help, formatter_class=HelpFormatter)
        p.verb, p.subparsers, p.siblings = verb, sub, placeholders
        placeholders[verb.name] = p
    if load_all:
        for p in placeholders.values():
            load(p)
    return parser


def _dispatch(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as e:
        err(str(e))
        return e.code
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except Exception as e:
        # Scheduler errors are expected failures too; their module is imported only by the verbs that use it.
        base = sys.modules.get("hyperjob.schedule.base")
        if base is not None and isinstance(e, base.SchedulerError):
            err(str(e))
            return 1
        raise
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture): nothing to silence
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # fail here, inside the handler, rather than at exit with a stray traceback
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
