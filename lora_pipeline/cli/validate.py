"""`lora-pipeline validate`: a config, its data (tokenized as formatted_dataset would) and its memory plan
checked, without loading any model's weights."""

from __future__ import annotations

import argparse
import textwrap
import json
import sys
from pathlib import Path

from lora_pipeline.cli.session import EXIT_USER_ERROR, check_data_early
from lora_pipeline.config.registry import load_config_file, load_sweep_file, partition_key_for
from lora_pipeline.errors import DataError, ModelError, ModelRefused


def add_parser(commands, parents: list[argparse.ArgumentParser]) -> None:
    """Declare `validate` and its arguments."""
    parser = commands.add_parser(
        "validate", parents=parents,
        help="check a config and its data without loading any model",
        description="Validate CONFIG against the schema, read and check its dataset and tokenize it with the "
                    "base's tokenizer (its weights are not loaded): too many examples over training.max_length "
                    "are refused with the max_length that would keep 95% and 99% of them whole.",
    )
    parser.add_argument("config", type=Path, help="model config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {EXIT_USER_ERROR}, as run would refuse it, when the memory plan does not fit this machine "
                        "(without it the verdict is printed and validate exits 0)")


def do_cli(args: argparse.Namespace) -> int:
    """Validate and print the summary (text or JSON); a sweep file: every variant, one summary each."""
    variants = load_sweep_file(args.config, args.overrides)
    if variants is not None:
        summaries = []
        for key, model_config in variants.items():
            summary, cleaned, memory_lines = do_validate(model_config, key)
            summaries.append(summary)
            if not args.json:
                print_summary(args.config, model_config, summary, cleaned, memory_lines)
        if args.json:
            print(json.dumps({"sweep": partition_key_for(args.config), "variants": summaries}))
        return _strict_status(args, summaries)
    model_config = load_config_file(args.config, args.overrides)
    summary, cleaned, memory_lines = do_validate(model_config, partition_key_for(args.config))
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(args.config, model_config, summary, cleaned, memory_lines)
    return _strict_status(args, [summary])


def _strict_status(args: argparse.Namespace, summaries: list[dict]) -> int:
    """EXIT_USER_ERROR under --strict when a plan does not fit (run refuses such a plan before loading), else 0."""
    misfits = [s["partition"] for s in summaries if (s.get("memory_plan") or {}).get("fits") is False]
    if args.strict and misfits:
        print(f"--strict: the memory plan of {', '.join(misfits)} does not fit this machine", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def do_validate(model_config, key: str) -> tuple[dict, object, list[str]]:
    """The validation summary of a config, its cleaned rows (None for a remote source, read when raw_dataset
    runs) and the memory plan's lines to print."""
    from lora_pipeline.ml.base.precision import detect_device
    from lora_pipeline.ml.training.distributed import Launch, plan_launch

    device = detect_device()
    # Refused before the data is read; a preference run trains in one process, whatever the GPUs.
    launch = (Launch(strategy="none", nproc_per_node=1, nnodes=1) if model_config.preference_tuning
              else plan_launch(model_config.training.distributed, device))
    dataset = model_config.dataset
    local = all(is_local_source(source.dataset.source) for source in dataset.mixture) if dataset.sources \
        else is_local_source(dataset.source)
    cleaned, (train_rows, eval_rows) = check_data_early(model_config) if local else (None, (None, None))
    mixture = getattr(cleaned, "mixture", None) is not None  # a CleanedMixture: each source's rows apart
    mode = model_config.quantization.mode
    summary = {
        "partition": key,
        "config_hash": model_config.canonical_hash(),
        "base_model": model_config.base_model,
        "builtin_base": model_config.builtin_base,
        "method": "QLoRA" if mode in ("nf4", "fp4") else ("LoRA on int8" if mode == "int8" else "LoRA"),
        "dataset": dataset.source_label,
        # A mixture's: the format its template is chosen for; each source's in "sources".
        "format": (cleaned.prompt_format if mixture else cleaned.loaded.format) if cleaned else None,
        "format_detected": (cleaned.detected if mixture else cleaned.loaded.detected) if cleaned else None,
        "cleaning": cleaned.counts if cleaned else None,
        **({"sources": cleaned.summary()} if mixture else {}),
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "tokens": token_summary(model_config, cleaned) if cleaned and not model_config.preference_tuning else None,
        "objective": model_config.training.objective,
        **({"init_adapter": model_config.training.init_adapter} if model_config.training.init_adapter else {}),
    }
    # A built-in base's vocabulary is trained on the data: the plan counts the head the trainer will train.
    tokens = summary["tokens"] or {}
    vocab = tokens.get("vocab_size") if model_config.builtin_base else None
    summary["memory_plan"], memory_lines = memory_summary(model_config, device, vocab,
                                                          tokens.get("max_length_keeping_95%") or 64)
    summary["launch"] = launch.as_dict()
    memory_lines.insert(0, f"  training    {launch.world_size} process{'es' if launch.world_size > 1 else ''}"
                           + (f" ({launch.strategy}, {launch.nproc_per_node} per machine x {launch.nnodes})"
                              if launch.distributed else ", in the Dagster step"))
    return summary, cleaned, memory_lines


def print_summary(path: Path, model_config, summary: dict, cleaned, memory_lines: list[str]) -> None:
    """The validation summary for a person."""
    source = summary["dataset"]
    print(f"{path}: valid (model {summary['partition']}, config {summary['config_hash'][:12]})")
    print(f"  base model  {summary['base_model']} ({summary['method']}, quantization {model_config.quantization.mode})")
    if model_config.preference_tuning and cleaned is not None:
        start = model_config.training.init_adapter
        print(f"  objective   {model_config.training.objective} (beta {model_config.preference.beta:g}), reference: "
              + (f"the champion of {start}, which it starts from" if start else "the base, adapters disabled"))
        print(f"  dataset     {source}: {cleaned.rows} {cleaned.loaded.format} rows, each parsed "
              f"{'(detected)' if cleaned.loaded.detected else ''}; rendered, split by prompt and length-checked "
              "when formatted_dataset runs" + (", with the starting adapter's template" if start else ""))
    elif cleaned is not None:
        counts = cleaned.counts
        if "sources" in summary:  # a mixture: each source, then the rows before weights
            for name, facts in summary["sources"].items():
                print(f"  source      {name}: {facts['source']}: {facts['rows_in']} {facts['format']}"
                      f"{' (detected)' if facts['format_detected'] else ''} rows, {facts['share']}")
            print(f"  dataset     {len(summary['sources'])} sources: {counts['rows_in']} rows -> "
                  f"{summary['train_rows']} training, {summary['eval_rows']} held-out before weights (mixed when "
                  "formatted_dataset runs)")
        else:
            detected = " (detected)" if cleaned.loaded.detected else ""
            print(f"  dataset     {source}: {counts['rows_in']} {cleaned.loaded.format}{detected} rows -> "
                  f"{summary['train_rows']} training, {summary['eval_rows']} held-out")
        dropped = counts["empty"] + counts["exact_duplicates"] + counts["normalized_duplicates"]
        if dropped:
            print(f"              dropped {counts['empty']} empty, {counts['exact_duplicates']} exact and "
                  f"{counts['normalized_duplicates']} case/whitespace duplicates (token lengths are "
                  "checked when formatted_dataset runs)")
    else:
        from lora_pipeline.ml.data.sources import source_kind

        where = "a hub dataset" if source_kind(source) == "hub" else "remote"
        print(f"  dataset     {source}: {where}, read when raw_dataset runs")
    tokens = summary["tokens"]
    if tokens and "unknown" in tokens:
        print(f"  tokens      checked when formatted_dataset runs ({tokens['unknown']})")
    elif tokens:
        split = f", {tokens['split_documents']} documents split into blocks" if tokens["split_documents"] else ""
        print(f"  tokens      {tokens['examples']:,} examples, longest {tokens['longest']:,}; "
              f"max_length {tokens['max_length_keeping_95%']:,} keeps 95% whole, "
              f"{tokens['max_length_keeping_99%']:,} keeps 99%")
        print(f"              {tokens['longer']:,} over max_length {tokens['max_length']} "
              f"({tokens['overlong']}: {tokens['tokens_lost_to_max_length']:,} tokens lost{split})")
        turns = (f"; {tokens['per_turn_rows']:,} conversations as {tokens['per_turn_examples']:,} per-turn examples "
                 f"(+{tokens['per_turn_extra_tokens']:,} tokens)" if tokens["per_turn_rows"] else "")
        dropped = (f"; {tokens['unrenderable_dropped']:,} rows the template cannot render dropped"
                   if tokens["unrenderable_dropped"] else "")
        print(f"  template    {tokens['template']}{turns}{dropped}")
        if tokens["first_example"]:
            print("  first example as it will be trained (learned tokens between ⟦ ⟧):")
            print(textwrap.indent(_shortened(tokens["first_example"]["marked"]), "    "))
    print("\n".join(memory_lines))


def _shortened(text: str, limit: int = 1500) -> str:
    """A long example's start and end, so the learned end of it stays in view."""
    return text if len(text) <= limit else f"{text[: limit // 3]}\n[... {len(text) - limit:,} characters ...]\n" \
        f"{text[-2 * limit // 3:]}"


def token_summary(model_config, cleaned) -> dict:
    """Token lengths and the over-length check of formatted_dataset, on the same rows with the same code
    (formatted into a folder that is then removed); refused as that check would refuse. A hub base's
    tokenizer files are fetched; when they cannot be, the check is left to formatted_dataset."""
    import tempfile

    from lora_pipeline.assets.data import format_settings
    from lora_pipeline.ml.data.clean import tokenizer_corpus
    from lora_pipeline.ml.data.formatted import format_dataset, lost_to_max_length
    from lora_pipeline.ml.data.quality import LengthAdvice, over_length_problem, over_length_rate
    from lora_pipeline.resources.hub import ModelHub, refuse_pickle_only

    settings = format_settings(model_config)
    mixture = getattr(cleaned, "mixture", None) is not None  # a CleanedMixture: formatted and mixed as one
    try:
        tokenizer = ModelHub().tokenizer(model_config.base_model, model_config.base_revision,
                                         lambda: (cleaned.corpus(settings.eval_fraction) if mixture
                                                  else tokenizer_corpus(cleaned, settings.eval_fraction)),
                                         trust_remote_code=model_config.trust_remote_code)
    except ModelRefused:
        raise  # what run refuses, validate refuses, with the same message
    except ModelError as exc:
        return {"unknown": f"no tokenizer here: {exc}"}
    if Path(model_config.base_model).is_dir() and not model_config.allow_pickle:
        refuse_pickle_only(Path(model_config.base_model), model_config.base_model)  # run checks it when it loads
    with tempfile.TemporaryDirectory(prefix="lora-pipeline-validate-") as folder:
        if mixture:
            from lora_pipeline.ml.data.mixing import format_mixture

            sources = cleaned.to_format(settings, model_config.dataset.template, tokenizer.chat_template)
            formatted = format_mixture(sources, tokenizer, model_config.dataset.mix_seed, folder=Path(folder))
        else:
            formatted = format_dataset(cleaned, tokenizer, settings, folder=Path(folder))
    counts = formatted.counts
    advice = LengthAdvice.of(formatted.token_lengths, settings.max_length)
    examples = counts["train_rows"] + counts["eval_rows"]
    dropped = lost_to_max_length(counts)
    rate = over_length_rate(counts["truncated"], dropped, examples)
    limit = model_config.dataset.max_truncation_rate
    if rate > limit:
        where = model_config.dataset.source_label if mixture else cleaned.loaded.source
        raise DataError(f"{where}: " + over_length_problem(
            rate, limit, counts["truncated"], dropped, counts["tokens_lost_to_max_length"], advice))
    first = formatted.preview.iloc[0] if len(formatted.preview) else None
    return {
        "vocab_size": len(tokenizer),
        "template": formatted.template,
        "per_turn_rows": counts["per_turn_rows"],
        "per_turn_examples": counts["per_turn_examples"],
        "per_turn_extra_tokens": counts["per_turn_extra_tokens"],
        "unrenderable_dropped": counts["unrenderable_dropped"],
        # What will be trained, before any GPU hour: the first example as rendered, the learned parts marked.
        "first_example": None if first is None else {"marked": first["marked"], "learned": first["learned"]},
        "examples": examples,
        "longest": int(formatted.token_lengths.max()),
        "max_length": settings.max_length,
        "overlong": formatted.overlong,
        "longer": advice.longer,
        "truncation_rate": rate,
        "tokens_lost_to_max_length": counts["tokens_lost_to_max_length"],
        "split_documents": counts["split_documents"],
        "max_length_keeping_95%": advice.keeps_95,
        "max_length_keeping_99%": advice.keeps_99,
    }


def is_local_source(source: str) -> bool:
    """Whether validate reads the source now: a path here (a missing one is 'file not found' now, not a hub
    look-up later) or, offline, a hub dataset, which can only come from the local cache. Remote ones are read
    by raw_dataset."""
    from lora_pipeline.ml.data.sources import source_kind
    from lora_pipeline.ml.hub_reach import hub_unreachable

    kind = source_kind(source)
    return kind == "local" or (kind == "hub" and hub_unreachable() is not None)


def memory_summary(model_config, device, vocab_size: int | None = None,
                   shortest: int = 64) -> tuple[dict | None, list[str]]:
    """The training's memory plan on this machine's device, as JSON and as lines to print; no knob suggests a
    max_length below shortest."""
    from lora_pipeline.ml.base.fit import assess_fit

    assessment = assess_fit(model_config, device, vocab_size=vocab_size, shortest=shortest)  # a local base's config.json is read as is
    if assessment is None:
        return None, ["  memory      unknown here: the base model's config.json is not shipped or local"]
    lines = ["  " + line for line in assessment.plan.render().splitlines()]
    lines.append(f"  {'fits' if assessment.fits else 'does NOT fit'} in {assessment.where()}")
    lines += [f"    {knob}" for knob in assessment.knobs[:4]]
    return assessment.summary(), lines
