"""`lora-pipeline`: run, validate and list model configs from the terminal.

This module only wires the commands: each lives in its own module (run.py, validate.py,
list_models.py, promote.py for promote and rollback, generate.py, chat.py) with its parser (`add_parser`) apart from its work (`do_*`). Errors are mapped to
exit codes here, once: a user error (config, data, model) is one line and exit code 2, anything
else exit code 1 (`--debug` shows the traceback).

Runs execute in-process on the persistent Dagster instance ($DAGSTER_HOME, default .dagster/ in
the working directory), so they show up in `make ui` like runs launched there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lora_pipeline.cli import chat, generate, list_models, promote, run, validate
from lora_pipeline.cli.session import EXIT_RUN_FAILED, EXIT_USER_ERROR, quiet_libraries, user_error_in

COMMANDS = {"run": run, "validate": validate, "list": list_models, "promote": promote, "rollback": promote,
            "generate": generate, "chat": chat}


def build_parser() -> argparse.ArgumentParser:
    """The `lora-pipeline` parser: `--debug` before or after any command."""
    parser = argparse.ArgumentParser(
        prog="lora-pipeline",
        description="Fine-tune language models with LoRA/QLoRA as Dagster assets: "
        "raw_dataset -> formatted_dataset -> quantized_base -> trained_adapter -> merged_model -> eval_report "
        "-> champion (and a leaderboard for sweeps).",
        epilog=run.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_debug_flag(default=False)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):  # a module may declare several commands
        # SUPPRESS: a command's own default must not overwrite `--debug` given before the command.
        module.add_parser(commands, parents=[_debug_flag(default=argparse.SUPPRESS)])
    return parser


def _debug_flag(default) -> argparse.ArgumentParser:
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("--debug", action="store_true", default=default, help="show full tracebacks and library logs")
    return flag


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, and map its errors to one line and an exit code."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    try:
        return COMMANDS[args.command].do_cli(args)
    except Exception as exc:
        user_error = user_error_in(exc)
        if args.debug:
            raise
        if user_error is not None:
            print(f"error: {user_error}", file=sys.stderr)
            return EXIT_USER_ERROR
        message = str(exc).strip()
        print(f"error: {type(exc).__name__}: {message.splitlines()[0] if message else ''}"
              " (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_RUN_FAILED
