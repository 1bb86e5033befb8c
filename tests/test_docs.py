"""The docs cannot drift: the generated reference pages are current, and every command in the docs is checked.

Every shell command in a fenced `bash`, `console` or `shell` block of README.md and docs/ is checked as far as it
can be without training:

- `lora-pipeline ...`: parsed by the real parser; the config files it names exist and load through the schema
  with its `--set` overrides (a sweep file: every variant), `--select` names stages, a rollback's model is a
  configured one. `validate` on a built-in base, `list` and `--help` are run, in a temporary instance and
  store. A command that trains or needs trained models (`run`, `promote`, `rollback`, `generate`) must be one
  an end-to-end test runs: the test reads the CLI calls of tests/*.py. The few that none runs are listed in
  NOT_RUN_BY_A_TEST with the reason.
- `make X`: a target of the Makefile. `python FILE` / `python -m MODULE` / `torchrun ... -m MODULE`: the file or
  module exists and knows every option given. `dg ...`: tests/test_dg.py runs that subcommand; the assets and
  partition it names exist.
- Other tools (vLLM, Ollama, llama.cpp, Docker, Helm, ...) are in EXTERNAL with the reason they are not run;
  the repository files they name with -f must exist.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_LANGUAGES = {"bash", "console", "shell", "sh"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>.*)$")

# Configs that stand for the reader's own: a command naming one is checked on configs/tiny-demo.yaml, and
# matches a test's call on any config.
PLACEHOLDER_CONFIGS = {"configs/my-model.yaml"}
PLACEHOLDER_MODELS = {"my-model"}
STAND_IN = "configs/tiny-demo.yaml"

# Docs commands that train (or need trained models) which no test runs as written, and why.
NOT_RUN_BY_A_TEST = {
    "lora-pipeline run configs/tiny-mixture.yaml":
        "the whole mixture takes about four minutes on 2 cores; tests/test_mixture.py runs a micro mixture through "
        "eval_report and tiny-mixture's data stages through the CLI, pinning the page's figures",
    "lora-pipeline chat configs/tiny-demo.yaml --max-new-tokens 24":
        "needs tiny-demo trained (make demo); tests/test_chat.py drives chat with piped input over a micro "
        "model's trained adapter and checks its first answers against generate --json",
    "lora-pipeline run configs/tiny-demo.yaml --set training.eval_steps=20 --set training.keep_best=true":
        "the page's figures were measured by hand (tiny-demo evaluated every 10 steps); tests/test_held_out.py "
        "runs eval_steps with keep_best through the pipeline on a micro config and checks the last point against "
        "eval_report's adapter loss",
    "lora-pipeline run configs/tiny-demo.yaml --set training.distributed.nproc_per_node=2":
        "two processes training tiny-demo take minutes on 2 cores; tests/test_distributed.py runs the CLI with "
        "nproc_per_node 2 on a micro config and checks that two gloo processes train as one",
    "lora-pipeline run configs/tiny-demo.yaml --select raw_dataset,formatted_dataset "
    "--set dataset.source=my_chats.jsonl --set dataset.format=auto":
        "my_chats.jsonl is the reader's file; tests/test_cli.py runs --select raw_dataset,formatted_dataset on "
        "a micro config and tests/test_data.py reads every format",
    "lora-pipeline run configs/tiny-dpo.yaml --set training.objective=kto":
        "the tutorial's KTO figures were measured by hand; tests/test_preference_pipeline.py runs kto and orpo "
        "through the CLI on a micro preference config",
    "lora-pipeline run configs/my-model.yaml --select published_model --set publish.repo_id=me/my-model":
        "needs the Hub and a token; tests/test_publish.py runs --select published_model against a fake Hub, "
        "the repo id in the config",
    "lora-pipeline run configs/tiny-sweep.yaml":
        "three variants take minutes on 2 cores; tests/test_champion.py runs the tiny-lora-sweep sweep (two "
        "variants and a blend) through the CLI",
    "lora-pipeline rollback my-model --to 3f2a9c":
        "3f2a9c stands for a version of the reader's; tests/test_choosing.py rolls the champion history back to "
        "a given version prefix",
    "lora-pipeline generate configs/tiny-demo.yaml --prompt 'What is 2 plus 3?'":
        "needs tiny-demo trained (make demo); tests/test_champion.py runs generate on a micro model's adapter "
        "and tests/test_families_end_to_end.py on each family's",
    "lora-pipeline generate configs/tiny-sweep.yaml --prompt 'Name a prime number.' --json":
        "needs tiny-sweep trained; tests/test_generate.py answers with two configs' adapters side by side on "
        "one base",
}

# Tools the tests do not run, and why; -f FILE arguments that name repository files must exist.
EXTERNAL = {
    "source": "the shell's own; .venv/bin/activate exists once make has made the venv",
    "export": "sets a variable for the next command",
    "ollama": "Ollama is not installed here; tests/test_gguf.py checks the GGUF files and the Modelfiles' FROM, "
              "ADAPTER and TEMPLATE lines",
    "llama-cli": "llama.cpp's CLI is not built here (only llama-tokenize and llama-quantize); tests/test_gguf.py "
                 "tokenizes with llama-tokenize on the GGUF",
    "docker": "no Docker daemon in the test environment; tests/test_deploy.py checks that deploy/helm/values.yaml "
              "agrees with the image deploy/Dockerfile builds",
    "helm": "no cluster and no Helm binary; tests/test_deploy.py checks deploy/helm/values.yaml against the Dagster "
            "chart's fields and the pods against the Kubernetes API schema",
}

# run/promote/rollback/generate options compared by presence only (their values are the reader's).
SHAPE_ONLY = {"to", "prompt", "max_new_tokens"}
IGNORED = {"json", "debug", "storage", "command"}
ANY = "\0any"  # a value a test computes (str(path), a variable): matches what it may


@dataclass(frozen=True)
class Command:
    """One shell command from a fenced block of a docs page."""

    where: str
    text: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def fenced_blocks(path: Path):
    """(line number, language, lines) of every fenced block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").split("\n")
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening:
            fence, indent = opening.group("fence"), opening.group("indent")
            end = index + 1
            while end < len(lines) and not re.fullmatch(rf"[ \t]*{re.escape(fence)}[`~]*[ \t]*", lines[end]):
                end += 1
            body = [line[len(indent):] if line.startswith(indent) else line for line in lines[index + 1:end]]
            yield index + 1, opening.group("info").strip(), body
            index = end
        index += 1


def shell_commands(path: Path) -> list[Command]:
    """The commands of a file's shell blocks: continuations joined, comments and prompts stripped."""
    found = []
    for start, info, body in fenced_blocks(path):
        language = info.split()[0] if info else ""
        if language not in SHELL_LANGUAGES:
            continue
        pending, first = "", None
        for offset, line in enumerate(body, start=start + 1):
            if language == "console":
                if not (line.startswith("$ ") or pending):
                    continue  # output
                line = line[2:] if line.startswith("$ ") else line
            first = first or offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = pending + line, ""
            argv = tuple(shlex.split(text, comments=True))
            if argv:
                found.append(Command(f"{path.relative_to(REPO)}:{first}", " ".join(shlex.quote(a) for a in argv), argv))
            first = None
    return found


def all_commands() -> list[Command]:
    return [command for path in DOC_FILES for command in shell_commands(path)]


COMMANDS = all_commands()


# ------------------------------------------------------------------------------------------ generated pages


def test_the_reference_pages_are_up_to_date():
    """docs/reference/ is what scripts/docs_reference.py makes from the schema and the parser now."""
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = [str(path.relative_to(REPO)) for path in module.stale_pages()]
    assert not stale, f"{', '.join(stale)} out of date with the code: run make docs-reference"


def test_the_reference_lists_every_config_key():
    """Every key of the schema, nested sections included, is a row of the config reference."""
    import pydantic

    from lora_pipeline.config.schema import ModelConfig

    def keys(section, prefix=""):
        for name, field in section.model_fields.items():
            inner = next((c for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
                          if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)
            yield from keys(inner, f"{prefix}{name}.") if inner else [f"{prefix}{name}"]

    page = (REPO / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", page, re.MULTILINE))
    assert rows == set(keys(ModelConfig))
    assert {"training.distributed.nproc_per_node", "dataset.source", "export.gguf"} <= rows


# ------------------------------------------------------------------------------------------ the pages


def test_every_fenced_block_names_its_language():
    """A block without a language would hide its commands from the checks below."""
    bare = [f"{path.relative_to(REPO)}:{line}" for path in DOC_FILES for line, info, _ in fenced_blocks(path) if not info]
    assert not bare, f"fenced blocks without a language (```bash, ```text, ```yaml, ...): {bare}"


def test_the_docs_have_commands_to_check():
    tools = {command.argv[0] for command in COMMANDS}
    assert {"lora-pipeline", "make", "python"} <= tools and len(COMMANDS) >= 20, tools


def test_the_readme_links_lead_somewhere():
    """mkdocs --strict checks the links between pages; the README is outside the site, so its links are checked here."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    missing = [target for target in targets if "://" not in target and not (REPO / target).exists()]
    assert targets and not missing, missing


def test_the_annotated_config_is_the_schema_with_its_defaults():
    """docs/configuration.md's commented file: every key exists, and every value shown is the default (the base
    model and the dataset source are examples)."""
    import yaml

    from lora_pipeline.config.registry import validate_config

    [block] = [body for _, info, body in fenced_blocks(REPO / "docs" / "configuration.md") if info == "yaml"]
    shown = yaml.safe_load("\n".join(block))
    config = validate_config(shown, "docs/configuration.md").model_dump(mode="json")  # unknown keys refused
    examples = {"base_model": shown["base_model"], "dataset": {"source": shown["dataset"]["source"]}}
    default = validate_config(examples, "the defaults").model_dump(mode="json")

    def differences(ours, theirs, prefix=""):
        for key, value in ours.items():
            if isinstance(value, dict):
                yield from differences(value, theirs[key], f"{prefix}{key}.")
            elif value != theirs[key]:
                yield f"{prefix}{key}: shown {value!r}, default {theirs[key]!r}"

    assert not list(differences(config, default)), list(differences(config, default))


def test_the_command_line_guide_names_every_command():
    """docs/command-line.md's synopsis has a line for every command the parser has."""
    [synopsis] = [body for _, info, body in fenced_blocks(REPO / "docs" / "command-line.md") if info == "text"]
    shown = {line.split()[1] for line in synopsis if line.startswith("lora-pipeline ")}
    [commands] = [action for action in parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert shown == set(commands.choices), f"docs/command-line.md's synopsis: {shown} vs the parser's {set(commands.choices)}"


# ------------------------------------------------------------------------------------------ the commands


@cache
def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.MULTILINE))


@cache
def parser() -> argparse.ArgumentParser:
    from lora_pipeline.cli import build_parser

    return build_parser()


def parse(argv) -> argparse.Namespace:
    """The real parser's reading of argv; its error (usage and message) as an assertion."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser().parse_args(list(argv))
    except SystemExit:
        raise AssertionError(f"lora-pipeline refuses {shlex.join(argv)}: {err.getvalue().strip()}") from None


@cache
def registry():
    from lora_pipeline.config.registry import ConfigRegistry

    return ConfigRegistry(REPO / "configs")


def load(config: str, overrides: list[str]) -> list:
    """The config (or a sweep's variants) the command would run, validated with its overrides."""
    from lora_pipeline.config.registry import load_config_file, load_sweep_file

    path = REPO / (STAND_IN if config in PLACEHOLDER_CONFIGS else config)
    assert path.is_file(), f"{config}: no such config file"
    variants = load_sweep_file(path, overrides)
    return list(variants.values()) if variants is not None else [load_config_file(path, overrides)]


def config_arguments(args: argparse.Namespace) -> list[str]:
    return [str(path) for path in getattr(args, "configs", None) or [getattr(args, "config", None)] if path is not None]


# -- what the tests run through the CLI


class Pattern(str):
    """An f-string argument of a test (f"training.objective={objective}"): matches what its literal parts allow."""

    def __new__(cls, node: ast.JoinedStr):
        parts = [re.escape(part.value) if isinstance(part, ast.Constant) else ".*" for part in node.values]
        made = super().__new__(cls, ANY)
        made.regex = "".join(parts)
        return made


def _resolve(node, names: dict):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float)):
        return str(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.JoinedStr):
        return Pattern(node)
    return ANY


@cache
def invocations_in_tests() -> list[tuple[str, argparse.Namespace]]:
    """Every lora-pipeline call the tests make and expect to succeed, as the parser reads it (ANY where the test
    computes a value). Calls made with check_rc other than 0 test an error and do not count."""
    from lora_pipeline.cli import COMMANDS as CLI_COMMANDS

    def constants(statements) -> dict:
        return {target.id: node.value.value for node in statements if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}

    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = constants(tree.body)
        for function in [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]:
            names = {**module, **constants(ast.walk(function))}
            refused = {id(arg) for node in ast.walk(function) if isinstance(node, ast.Call)
                       for keyword in node.keywords
                       if keyword.arg == "check_rc" and not (isinstance(keyword.value, ast.Constant)
                                                             and keyword.value.value == 0)
                       for arg in node.args}
            for node in ast.walk(function):
                if not isinstance(node, (ast.List, ast.Tuple)) or id(node) in refused:
                    continue
                items = [_resolve(item, names) for item in node.elts if not isinstance(item, ast.Starred)]
                if "lora_pipeline.cli" in items:
                    items = items[items.index("lora_pipeline.cli") + 1:]
                if not items or items[0] not in CLI_COMMANDS:
                    continue
                quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
                with quiet[0], quiet[1], contextlib.suppress(SystemExit):  # a test's --help prints and exits
                    found.append((f"{path.name}:{node.lineno}", parser().parse_args(items)))
    return found


def _same(ours, theirs) -> bool:
    if isinstance(theirs, Pattern):
        return re.fullmatch(theirs.regex, str(ours)) is not None
    return str(theirs) == ANY or str(ours) == str(theirs)


def matches(ours: argparse.Namespace, theirs: argparse.Namespace) -> bool:
    """Whether a test's call runs the docs' command: same command, same configs (a placeholder: any), same
    selection and overrides, same flags; values that are the reader's only present in both."""
    if ours.command != theirs.command:
        return False
    for name, value in vars(ours).items():
        other = getattr(theirs, name, None)
        if name in IGNORED:
            continue
        if name in ("config", "configs", "model"):
            mine = [str(v) for v in (value if isinstance(value, list) else [value])]
            others = other if isinstance(other, list) else [other]
            # A test's computed config (str(path)) stands for a config it wrote: only a placeholder matches it.
            if len(mine) != len(others) or not all(
                    m in PLACEHOLDER_CONFIGS | PLACEHOLDER_MODELS or str(o) == m for m, o in zip(mine, others)):
                return False
        elif name in SHAPE_ONLY:
            if value is not None and other is None:
                return False
        elif name == "overrides":
            left = list(other or [])
            for item in value or []:
                hit = next((index for index, candidate in enumerate(left) if _same(item, candidate)), None)
                if hit is None:
                    return False
                left.pop(hit)
            if left:
                return False
        elif other is None:  # an option the test's command lacks: the docs' must be its default
            if value not in (None, False, [], "*"):
                return False
        elif not _same(value, other):
            return False
    return True


def run_cli(argv, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    return subprocess.run([sys.executable, "-m", "lora_pipeline.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def check_lora_pipeline(command: Command, tmp_path) -> str:
    argv = command.argv[1:]
    if "--help" in argv or "-h" in argv:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            parser().parse_args(list(argv))
        assert done.value.code == 0 and out.getvalue().startswith("usage: lora-pipeline"), command
        return "run"
    args = parse(argv)
    overrides = getattr(args, "overrides", None) or []
    configs = [config for name in config_arguments(args) for config in load(name, overrides)]
    if getattr(args, "select", None) not in (None, "*"):
        from lora_pipeline.cli.selection import selected_asset_names, selection

        assert selected_asset_names(selection(args.select)), f"{command}: --select selects nothing"
    if args.command == "rollback" and args.model not in PLACEHOLDER_MODELS:
        models = set(registry().keys) | {registry().sweep_of(key) for key in registry().keys}
        assert args.model in models, f"{command}: no configured model {args.model!r}"
    if args.command == "list" or (args.command == "validate" and all(config.builtin_base for config in configs)):
        done = run_cli(argv, tmp_path)
        assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr[-2000:]}"
        return "run"
    if args.command == "validate":
        return "parsed and loaded (the base is on the hub)"
    runs = [where for where, theirs in invocations_in_tests() if matches(args, theirs)]
    listed = command.text in NOT_RUN_BY_A_TEST
    assert runs or listed, (f"{command}: no test runs this command; run it in an end-to-end test, or add it to "
                            "NOT_RUN_BY_A_TEST with the reason")
    assert not (runs and listed), f"{command} is run by {runs}: take it out of NOT_RUN_BY_A_TEST"
    return f"run by {runs[0]}" if runs else "not run: " + NOT_RUN_BY_A_TEST[command.text]


def _options(argv) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("-") and arg not in ("-m", "-")]


def check_python(command: Command) -> str:
    argv = list(command.argv[1:])
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{command}: no module {module}"
        source, given = Path(spec.origin), argv[argv.index("-m") + 2:]
    else:
        source, given = REPO / argv[0], argv[1:]
        assert source.is_file(), f"{command}: no file {argv[0]}"
    if command.argv[0] == "torchrun":
        return "module found (torchrun's own options are its)"
    text = source.read_text(encoding="utf-8")
    unknown = [option for option in _options(given) if f'"{option}"' not in text]
    assert not unknown, f"{command}: {source.name} has no option {unknown}"
    return "file and options found"


def check_dg(command: Command) -> str:
    tree = ast.parse((REPO / "tests" / "test_dg.py").read_text(encoding="utf-8"))
    tested = {tuple(arg.value for arg in node.args[:2]) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_dg"
              and all(isinstance(arg, ast.Constant) for arg in node.args[:2])}
    assert tuple(command.argv[1:3]) in tested, f"{command}: tests/test_dg.py runs only {sorted(tested)}"
    argv = list(command.argv)
    if "--assets" in argv:
        from lora_pipeline.assets.stages import stage_names
        from lora_pipeline.cli.selection import ON_DEMAND

        unknown = set(argv[argv.index("--assets") + 1].split(",")) - {*stage_names(), *ON_DEMAND}
        assert not unknown, f"{command}: no stage {unknown}"
    if "--partition" in argv:
        assert argv[argv.index("--partition") + 1] in registry().keys, f"{command}: no such partition"
    return "run by tests/test_dg.py"


def check_external(command: Command) -> str:
    tool = command.argv[0]
    assert tool in EXTERNAL, f"{command}: {tool} is neither checked nor in EXTERNAL with a reason"
    argv = list(command.argv)
    for flag in ("-f", "--file", "--values"):
        if flag in argv and tool in ("docker", "helm"):
            named = argv[argv.index(flag) + 1]
            assert (REPO / named).is_file(), f"{command}: no file {named}"
    return "not run: " + EXTERNAL[tool]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.where)
def test_every_command_in_the_docs_is_checked(command, tmp_path):
    argv = list(command.argv)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value before a command
        argv.pop(0)
    command = Command(command.where, command.text, tuple(argv))
    tool = argv[0]
    if tool == "lora-pipeline":
        outcome = check_lora_pipeline(command, tmp_path)
    elif tool == "make":
        targets = [arg for arg in argv[1:] if not arg.startswith("-") and "=" not in arg]
        assert targets and set(targets) <= makefile_targets(), f"{command}: not a Makefile target"
        outcome = "a Makefile target"
    elif tool in ("python", "python3", "torchrun"):
        outcome = check_python(command)
    elif tool == "dg":
        outcome = check_dg(command)
    else:
        outcome = check_external(command)
    assert outcome


def test_the_allow_lists_name_commands_the_docs_have():
    """An entry for a command the docs no longer show is stale."""
    texts = {command.text for command in COMMANDS}
    assert not set(NOT_RUN_BY_A_TEST) - texts, set(NOT_RUN_BY_A_TEST) - texts
    assert not set(EXTERNAL) - {command.argv[0] for command in COMMANDS}
