"""`lora-pipeline chat`: a conversation with trained adapters on one loaded base, switched and compared as it goes.

The session is generate's (generate.open_session: the same configs, store, blends and prompt
rendering); this module only reads lines, runs the slash commands and streams the answers.
"""

from __future__ import annotations

import argparse
import sys
import time

from lora_pipeline.cli.generate import add_model_arguments, open_session

# The REPL's /help, also the end of `chat --help`.
COMMANDS_HELP = """\
commands:
  /adapters         list the models (* marks the one answering)
  /use NAME         answer with NAME from now on (base: the bare base, no adapter)
  /compare [TEXT]   answer the last message again, or TEXT as a new one, with every model on the same
                    conversation, side by side (TEXT is kept, with the active model's answer)
  /reset            forget the conversation
  /system [TEXT]    TEXT is every model's system prompt from the next answer on (without TEXT: each its own
                    from training)
  /help             these commands
  /quit             leave (so does the end of input, Ctrl-D)
A line starting with // is sent as a message starting with /.
"""
EPILOG = """\
examples:
  lora-pipeline chat configs/tiny-demo.yaml
  lora-pipeline chat model-r8.yaml model-r16.yaml --adapter model-r16 --max-new-tokens 512
  lora-pipeline chat configs/tiny-sweep.yaml --temperature 0.7

The base loads once and every config's newest trained adapter (a sweep file: every variant's) is
attached to it. Each message is answered by the active model, streamed as it is generated, and
kept: every answer is to the whole conversation, rendered with the answering adapter's template
as its training rendered the data (the bare base and blends are asked as the first adapter is).
Input can be piped: one message or command a line.

""" + COMMANDS_HELP
COMMANDS = ("adapters", "use", "compare", "reset", "system", "help", "quit", "exit")


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `chat` and its arguments."""
    parser = commands.add_parser(
        "chat", parents=parents,
        help="talk with trained adapters on one loaded base: switch, compare side by side, reset",
        description="Load the base model once, attach the newest trained adapter of every CONFIG (named by its "
        "partition key, the file name without .yaml) and answer each line of input with the active one, keeping "
        "the conversation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, max_new_tokens=256)
    parser.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                        help="sample with this temperature (default: 0, greedy: the same conversation gets the same "
                        "answers)")
    parser.add_argument("--adapter", metavar="NAME",
                        help="the model answering first: a config's key, a --blend's name or base (default: the first "
                        "adapter)")


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or more, got {text}")
    return value


def do_cli(args: argparse.Namespace) -> int:
    """Load the session, say what answers, then read messages and commands until /quit or the end of input."""
    started = time.perf_counter()
    session = open_session(args, active=args.adapter, temperature=args.temperature)
    device = next(session.model.parameters()).device
    adapters = ", ".join(session.adapters + [f"{name} (blend)" for name in session.blends])
    print(f"base loaded once in {time.perf_counter() - started:.1f}s on {device}; adapters attached: {adapters}")
    print(f"answering: {session.active} (/use NAME switches, /compare asks every model, /help lists the commands)",
          flush=True)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and recall for input())
        except ImportError:
            pass
    while (line := _read_line(interactive)) is not None:
        try:
            if not handle(session, line, sys.stdout):
                break
        except KeyboardInterrupt:
            print("\n(interrupted: the conversation is as it was before that line)", flush=True)
        except Exception as exc:
            if args.debug:
                raise
            message = str(exc).strip()
            print(f"\nerror: {type(exc).__name__}: {message.splitlines()[0] if message else ''} (the conversation is "
                  "as it was before that line)", file=sys.stderr, flush=True)
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next line of input, None at its end. Piped lines are echoed, so the output reads as a transcript."""
    if interactive:
        try:
            return input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    line = line.rstrip("\r\n")
    print(f"you> {line}", flush=True)
    return line


def handle(session, line: str, out) -> bool:
    """Run one line: a message for the active model or a /command. False once the user asked to leave."""
    text = line.strip()
    if not text:
        return True
    if not text.startswith("/") or text.startswith("//"):
        _say(session, text[1:] if text.startswith("//") else text, out)
        return True
    command, _, rest = text[1:].partition(" ")
    rest = rest.strip()
    if command in ("quit", "exit"):
        return False
    if command == "help":
        print(COMMANDS_HELP.rstrip(), file=out)
    elif command == "adapters":
        for name in session.names:
            mark = "*" if name == session.active else " "
            print(f"{mark} {name} ({'no adapter' if name == 'base' else session.kind(name)})", file=out)
    elif command == "use":
        _use(session, rest, out)
    elif command == "compare":
        _compare(session, rest or None, out)
    elif command == "reset":
        turns = session.reset()
        print(f"conversation cleared ({turns} turn{'s' if turns != 1 else ''} forgotten)", file=out)
    elif command == "system":
        session.system = rest or None
        said = f"system prompt for every model: {rest}" if rest else "system prompt: each model's own from training"
        print(f"{said} (from the next answer on)", file=out)
    else:
        _refuse(f"unknown command /{command}{_closest(command)}; /help lists the commands", out)
    out.flush()
    return True


def _say(session, text: str, out) -> None:
    """The active model's answer to the message, streamed as it comes."""
    print(f"{session.active}> ", end="", file=out, flush=True)
    answer = session.reply(text, stream=_writer(out))
    print("" if answer else "(empty answer)", file=out, flush=True)


def _use(session, name: str, out) -> None:
    from lora_pipeline.ml.chat import UnknownModel

    if not name:
        print(f"answering: {session.active} (choose from: {', '.join(session.names)})", file=out)
        return
    try:
        session.use(name)
    except UnknownModel as refused:
        _refuse(str(refused), out)
        return
    print(f"answering: {name}", file=out)


def _compare(session, text: str | None, out) -> None:
    """Every model's answer under its name, each streamed as it comes."""
    if text is None and not any(message["role"] == "user" for message in session.history):
        _refuse("nothing to compare yet: send a message first, or /compare TEXT", out)
        return
    written = []  # per model so far, whether its answer had any text

    def close_answer() -> None:
        if written:
            print("" if written[-1] else "(empty answer)", file=out, flush=True)

    def before(name: str):
        close_answer()
        what = "no adapter" if name == "base" else session.kind(name)
        print(f"=== {name} ({what}{', answering' if name == session.active else ''})", file=out, flush=True)
        written.append(False)
        write = _writer(out)

        def piece(text: str) -> None:
            written[-1] = True
            write(text)
        return piece

    session.compare(text, stream=before)
    close_answer()


def _writer(out):
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()
    return write


def _refuse(message: str, out) -> None:
    out.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def _closest(command: str) -> str:
    import difflib

    close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
    return f" (did you mean /{close[0]}?)" if close else ""
