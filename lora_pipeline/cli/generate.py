"""`lora-pipeline generate`: one prompt answered by several trained adapters and their base, side by side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.config.registry import load_config_file, load_sweep_file, partition_key_for
from lora_pipeline.errors import ConfigError, LoraPipelineError

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig

EPILOG = """\
examples:
  lora-pipeline generate configs/tiny-demo.yaml --prompt "What is 2 plus 3?"
  lora-pipeline generate model-r8.yaml model-r16.yaml --prompt "Summarize: ..." --max-new-tokens 128
  lora-pipeline generate configs/tiny-sweep.yaml --prompt "Name a prime number." --json

Every config needs its trained_adapter published (`lora-pipeline run CONFIG --select +trained_adapter`),
all on the same base model (same quantized_base content). A sweep file stands for all its variants.
Each adapter is asked the prompt the way its training rendered prompts (the config's dataset.format,
dataset.template and dataset.system_prompt); the base is asked what the first adapter is asked.
Decoding is greedy, so the answers are reproducible. `lora-pipeline chat` keeps the base loaded for a
conversation with the same adapters.
"""


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `generate` and its arguments."""
    parser = commands.add_parser(
        "generate", parents=parents,
        help="answer one prompt with several adapters and their base, side by side",
        description="Load the base model once, attach the newest trained adapter of every CONFIG (named by "
        "its partition key, the file name without .yaml) and answer PROMPT with the bare base and with each "
        "adapter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, max_new_tokens=64)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt, as a user would type it")
    parser.add_argument("--json", action="store_true",
                        help='print {"prompt": ..., "answers": {"base": ..., KEY: ...}} as the last stdout line')


def add_model_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The arguments generate and chat share: which adapters answer, where they are stored, how they answer."""
    parser.add_argument("configs", type=Path, nargs="+", metavar="CONFIG",
                        help="model config YAML (or sweep file) whose adapter answers; several share one base")
    parser.add_argument("--storage", metavar="URI",
                        help="artifact store root: a folder or s3://bucket/prefix (default: $LORA_PIPELINE_STORAGE "
                        "or ./artifacts)")
    parser.add_argument("--max-new-tokens", type=_positive, default=max_new_tokens, metavar="N",
                        help=f"longest answer in tokens (default: {max_new_tokens})")
    parser.add_argument("--blend", action="append", default=[], metavar="NAME=COMBINATION:W1,W2[@DENSITY]",
                        help="also answer with a weighted blend of the given adapters, in the order given "
                        "(PEFT's add_weighted_adapter: linear, cat, svd, ties, dare_ties, ...), e.g. "
                        "--blend mix=linear:0.5,0.5 or --blend t=ties:0.7,0.3@0.5 (repeatable)")
    parser.add_argument("--thinking", choices=("on", "off"),
                        help="switch a thinking model's reasoning on or off where its template has the switch "
                        "(Qwen3's enable_thinking); by default the prompt ends as training's prompts did")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Model:
    """One model to ask: the config file it comes from, its partition key and its config."""

    config_path: Path
    key: str
    model_config: "ModelConfig"


def do_cli(args: argparse.Namespace) -> int:
    """Answer the prompt with the base and every adapter (one user turn of a chat session), print side by side."""
    answers = open_session(args).compare(args.prompt)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "answers": answers,
                          "thinking": "as trained" if args.thinking is None else args.thinking}))
    else:
        print_side_by_side(args.prompt, answers, sys.stdout)
    return 0


def open_session(args: argparse.Namespace, **settings):
    """Resolve the configs and the store, load their shared base once with every adapter (and --blend) attached.

    settings: ChatSession's (active, temperature). What the options get wrong is a ConfigError naming the option,
    said before the base loads where it can be."""
    from lora_pipeline.ml.adapters import NoThinkingSwitch
    from lora_pipeline.ml.base.precision import detect_device
    from lora_pipeline.ml.chat import BlendRefused, ChatSession, UnknownModel
    from lora_pipeline.resources.factory import default_resources

    models = models_of(args.configs)
    storage = default_resources(storage_root=args.storage)["storage"]
    base_dir = shared_base(storage, models, args.storage)
    adapters = {model.key: adapter_dir_of(storage, model, args.storage) for model in models}
    thinking = None if args.thinking is None else args.thinking == "on"
    styles = {model.key: dataclasses.replace(prompt_style(storage, adapters[model.key], model),
                                             enable_thinking=thinking) for model in models}
    blends = [parse_blend(text, list(adapters)) for text in args.blend]
    try:
        return ChatSession.load(
            base_dir, adapters, styles, detect_device(), max_new_tokens=args.max_new_tokens,
            trust_remote_code=any(model.model_config.trust_remote_code for model in models), blends=blends,
            **settings,
        )
    except NoThinkingSwitch as refused:
        raise ConfigError(f"--thinking: {refused}") from None
    except BlendRefused as refused:
        raise ConfigError(f"--blend: {refused}") from None
    except UnknownModel as refused:
        raise ConfigError(f"--adapter: {refused}") from None


def parse_blend(text: str, adapters: list[str]):
    """--blend NAME=COMBINATION:W1,W2[@DENSITY] over the adapters in the order given."""
    import re

    from lora_pipeline.ml.adapters import Blend

    match = re.fullmatch(r"([A-Za-z0-9._-]+)=([a-z_]+):([-0-9.eE,]+?)(?:@([0-9.]+))?", text.strip())
    if not match:
        raise ConfigError(f"--blend {text!r}: expected NAME=COMBINATION:W1,W2[@DENSITY], e.g. mix=linear:0.5,0.5")
    name, combination, weights, density = match.groups()
    if name == "base" or name in adapters:
        raise ConfigError(f"--blend {text!r}: the name {name!r} is taken (by the base or an adapter)")
    try:
        values = tuple(float(weight) for weight in weights.split(","))
    except ValueError:
        raise ConfigError(f"--blend {text!r}: weights must be numbers") from None
    if len(values) != len(adapters):
        raise ConfigError(f"--blend {text!r}: {len(values)} weights for {len(adapters)} adapters ({', '.join(adapters)})")
    return Blend(name, tuple(adapters), values, combination, float(density) if density else None)


def models_of(paths: list[Path]) -> list[Model]:
    """Every config file's models (a sweep file's variants), each key once and none named 'base'."""
    models: dict[str, Model] = {}
    for path in paths:
        variants = load_sweep_file(path) or {partition_key_for(path): load_config_file(path)}
        for key, model_config in variants.items():
            if key in models:
                raise ConfigError(f"{path}: model {key!r} is already given by {models[key].config_path}")
            if key == "base":
                raise ConfigError(f"{path}: a model keyed 'base' would hide the base's own answer; rename the file")
            models[key] = Model(path, key, model_config)
    return list(models.values())


def _published(storage, model: Model, asset: str, storage_flag: str | None):
    """The newest published artifact of a model's asset, or a ConfigError saying which run makes it."""
    try:
        return storage.current(model.key, asset)
    except LoraPipelineError:
        flag = f" --storage {storage_flag}" if storage_flag else ""
        raise ConfigError(f"{model.config_path}: model {model.key!r} has no published {asset} in {storage.root}; "
                          f"run `lora-pipeline run {model.config_path} --select +trained_adapter{flag}` first") from None


def shared_base(storage, models: list[Model], storage_flag: str | None) -> Path:
    """The local folder of the one base every model was trained on, or a ConfigError naming two that differ.

    Bases are compared by content (the store's digest without lineage and card): each model's
    quantized_base is its own artifact, whose lineage names its model, so equal bases made for two
    configs have different refs but the same content.
    """
    first, first_digest = None, None
    for model in models:
        ref = _published(storage, model, "quantized_base", storage_flag)
        digest = storage.content_digest(ref)
        if first is None:
            first, first_digest, base_ref = model, digest, ref
        elif digest != first_digest:
            raise ConfigError(
                f"{first.config_path} and {model.config_path} were trained on different bases ({first.key}: "
                f"{first.model_config.base_model}, {model.key}: {model.model_config.base_model}; quantized_base "
                f"content {first_digest[:12]} vs {digest[:12]}); adapters answer side by side only on one base"
            )
    return storage.local_path(base_ref)


def adapter_dir_of(storage, model: Model, storage_flag: str | None) -> Path:
    """The local folder of a model's newest trained adapter (with its tokenizer)."""
    return storage.local_path(_published(storage, model, "trained_adapter", storage_flag))


def prompt_style(storage, adapter_dir: Path, model: Model):
    """How the adapter's training rendered prompts: the settings of the config that trained it (from its
    lineage, which holds any --set override) and the row format its formatted_dataset recorded.

    The recorded format matters when dataset.format is 'auto' (then the detected one is used); only
    then is the formatted_dataset read.
    """
    from lora_pipeline.assets.data import FORMAT_SUMMARY
    from lora_pipeline.assets.provenance import parent_lineage
    from lora_pipeline.ml.adapters import PromptStyle
    from lora_pipeline.resources.storage import ArtifactRef

    lineage = parent_lineage(adapter_dir)
    dataset = {**model.model_config.dataset.model_dump(), **lineage.get("config", {}).get("dataset", {})}
    fmt = dataset["format"]
    if fmt == "auto":
        parent = lineage.get("parents", {}).get("formatted_dataset")
        # Verification reads only the uri and sha256 of a ref (as champion.py does for a report's parent).
        ref = (ArtifactRef(uri=parent["uri"], sha256=parent["sha256"], size_bytes=0, files=0) if parent
               else storage.current(model.key, "formatted_dataset"))
        fmt = json.loads((storage.local_path(ref) / FORMAT_SUMMARY).read_text(encoding="utf-8"))["format"]
    return PromptStyle(format=fmt, template=dataset["template"], system_prompt=dataset["system_prompt"],
                       reasoning=dataset.get("reasoning", "auto"))


def print_side_by_side(prompt: str, answers: dict[str, str], stream) -> None:
    """The prompt, then each model's name over its answer."""
    print(f"prompt: {prompt}", file=stream)
    for name, answer in answers.items():
        title = "base (no adapter)" if name == "base" else f"{name} (adapter)"
        print(f"\n=== {title}\n{answer or '(empty answer)'}", file=stream)
