"""Several LoRA adapters on one loaded base, switched at run time, blended, and prompted as trained. Dagster-free.

PEFT's own workflow: the base is loaded once, the first adapter with PeftModel.from_pretrained, the
others with load_adapter; set_adapter picks the one that answers and disable_adapter lets the bare
base answer. Every model compared this way sees the same base weights in memory (chat.ChatSession
holds them and asks them).

Blends go through PEFT's add_weighted_adapter, which (in the pinned PEFT 0.21.2,
peft/tuners/lora/model.py) has traps that give a wrong adapter without an error; add_blend refuses
them up front:
- a blend name already in use is ignored silently (`if adapter_name in ...peft_config: return`),
  so the old adapter would answer under the new recipe's name;
- the blend copies the first adapter's config with lora_alpha = r, so with use_rslora its scaling is
  lora_alpha/sqrt(r) = sqrt(r) instead of 1 (layer.py: `lora_alpha / math.sqrt(r)`), while the
  blended weights already carry each adapter's own scaling: the blend is sqrt(r) times too strong;
- only lora_A/lora_B are combined: DoRA's magnitude vectors are not (the blend keeps the base's
  norms), and a module trained in full (modules_to_save) gets a fresh copy of the base's module
  (utils/other.py, ModulesToSaveWrapper.update), so the trained one is dropped.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

# add_weighted_adapter's combination types. The first group combines lora_A and lora_B separately,
# which needs one rank across adapters; cat stacks them (rank = sum), the *_svd ones refactor the
# summed delta weight (rank = the largest).
SAME_RANK_COMBINATIONS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
COMBINATIONS = (*SAME_RANK_COMBINATIONS, "cat", "svd", "ties_svd", "dare_ties_svd", "dare_linear_svd",
                "magnitude_prune_svd")
# The ones that prune each adapter's values to `density` before combining them.
DENSITY_COMBINATIONS = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                        "magnitude_prune", "magnitude_prune_svd")


def adapter_name(key: str) -> str:
    """A model key (e.g. a sweep variant's, tiny-sweep.r4) as a PEFT adapter name: PEFT keeps adapters in torch
    module and parameter dicts, whose keys cannot contain '.' nor be one of their attributes (a blend or a
    config named half, eval or train: torch's add_module refuses it), which get a trailing '_'."""
    import torch

    name = key.replace(".", "_")
    taken = any(hasattr(holder, name) for holder in (torch.nn.ModuleDict(), torch.nn.ParameterDict()))
    return f"{name}_" if taken else name


def attach_adapters(base_model, adapters: dict[str, "str | Path"]):
    """Load the base once; the first adapter with PeftModel.from_pretrained(base, path, adapter_name=name), the
    rest with model.load_adapter(path, adapter_name=name); returns the PeftModel.

    Names must be unique and non-empty; a name reused (as a dict cannot hold it twice, e.g. a name
    already on a PeftModel passed in) raises ValueError.
    """
    from peft import PeftModel

    from lora_pipeline.ml.base.loading import require_safetensors_adapter

    if not adapters:
        raise ValueError("no adapter to attach")
    if any(not isinstance(name, str) or not name.strip() for name in adapters):
        raise ValueError(f"adapter names must be non-empty strings, got {list(adapters)!r}")
    dotted = [name for name in adapters if "." in name]
    if dotted:
        raise ValueError(f"adapter name {dotted[0]!r} contains '.', which PEFT cannot hold; use adapter_name()")
    taken = set(getattr(base_model, "peft_config", {}) or {})
    reused = [name for name in adapters if name in taken]
    if reused:
        raise ValueError(f"adapter name {reused[0]!r} is already attached to this model")
    for path in adapters.values():
        require_safetensors_adapter(Path(path))
    names = list(adapters)
    if isinstance(base_model, PeftModel):
        model = base_model
    else:
        first, names = names[0], names[1:]
        model = PeftModel.from_pretrained(base_model, str(adapters[first]), adapter_name=first)
    for name in names:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model


@contextlib.contextmanager
def using(model, name: "str | None"):
    """Within the block the model answers as adapter `name` (set_adapter), or as the bare base when name is None
    (disable_adapter()); the adapter active before is active again after it.

    For inference: the adapter is activated frozen (PEFT's set_adapter would otherwise make it trainable).
    """
    if name is None:
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        if isinstance(previous, str) and previous != name and previous in model.peft_config:
            model.set_adapter(previous, inference_mode=True)


@dataclass(frozen=True)
class Blend:
    """A new adapter made of attached ones: the name it gets, which adapters, their weights and how they combine.

    combination: one of COMBINATIONS (PEFT's combination_type). density: the fraction of each
    adapter's values kept before combining, for the ties, dare and magnitude_prune variants only.
    """

    name: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination: str = "linear"
    density: float | None = None


def add_blend(model, blend: Blend) -> str:
    """Add a weighted blend of attached adapters with model.add_weighted_adapter, guarding PEFT's known traps;
    returns the blend's name.

    Each refused case is a ValueError saying why (see the module docstring for what PEFT would do).
    """
    check_blend(model, blend)
    model.add_weighted_adapter(
        adapters=list(blend.adapters), weights=[float(weight) for weight in blend.weights], adapter_name=blend.name,
        combination_type=blend.combination, density=blend.density,
    )
    return blend.name


def check_blend(model, blend: Blend) -> None:
    """Raise ValueError if PEFT would refuse the blend or, worse, make a wrong adapter from it without a word."""
    configs = model.peft_config
    what = f"blend {blend.name!r}"
    if not isinstance(blend.name, str) or not blend.name.strip():
        raise ValueError(f"a blend needs a non-empty name, got {blend.name!r}")
    if blend.name in configs:
        raise ValueError(f"{what}: an adapter of that name is already attached (PEFT's add_weighted_adapter "
                         "would silently keep the old one); choose another name")
    adapters, weights = tuple(blend.adapters), tuple(blend.weights)
    if not adapters:
        raise ValueError(f"{what}: names no adapter to blend")
    unknown = [name for name in adapters if name not in configs]
    if unknown:
        raise ValueError(f"{what}: unknown adapter {unknown[0]!r} (attached: {', '.join(configs)})")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"{what}: lists an adapter twice ({', '.join(adapters)}); give each one weight")
    if len(weights) != len(adapters):
        raise ValueError(f"{what}: {len(weights)} weights for {len(adapters)} adapters")
    try:
        finite = all(math.isfinite(float(weight)) for weight in weights)
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"{what}: weights must be finite numbers, got {weights!r}")
    if blend.combination not in COMBINATIONS:
        raise ValueError(f"{what}: combination {blend.combination!r} is not supported (use one of "
                         f"{', '.join(COMBINATIONS)})")
    _check_density(blend, what)
    for name in adapters:
        _check_blendable(name, configs[name], what)
    # PEFT treats a blend of one adapter as linear, whatever was asked.
    if blend.combination in SAME_RANK_COMBINATIONS and len(adapters) > 1:
        ranks = {name: (configs[name].r, dict(configs[name].rank_pattern or {})) for name in adapters}
        if len(set(map(repr, ranks.values()))) > 1:
            listed = ", ".join(f"{name} r={rank}{' with rank_pattern' if pattern else ''}"
                               for name, (rank, pattern) in ranks.items())
            raise ValueError(f"{what}: combination {blend.combination!r} needs equal ranks ({listed}); use 'cat' "
                             "or an '*svd' combination for adapters of different ranks")


def _check_density(blend: Blend, what: str) -> None:
    if blend.combination in DENSITY_COMBINATIONS:
        if blend.density is None:
            raise ValueError(f"{what}: combination {blend.combination!r} needs a density (the fraction of each "
                             "adapter's values kept, 0 < density <= 1)")
        if not 0.0 < blend.density <= 1.0:
            raise ValueError(f"{what}: density must be in (0, 1], got {blend.density}")
    elif blend.density is not None:
        raise ValueError(f"{what}: density applies to {', '.join(DENSITY_COMBINATIONS)} only, not to "
                         f"{blend.combination!r}")


def _check_blendable(name: str, config, what: str) -> None:
    """Refuse an adapter whose blend PEFT 0.21.2 would get wrong (module docstring)."""
    if getattr(config, "use_rslora", False):
        raise ValueError(f"{what}: adapter {name!r} uses rsLoRA, which PEFT 0.21's add_weighted_adapter blends wrong "
                         "(the blend keeps use_rslora with lora_alpha=r, so it is scaled by sqrt(r) instead of 1)")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{what}: adapter {name!r} uses DoRA, whose magnitude vectors add_weighted_adapter does not "
                         "blend (the blend would keep the base's weight norms)")
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        raise ValueError(f"{what}: adapter {name!r} trains modules in full (modules_to_save or trainable tokens), "
                         "which add_weighted_adapter cannot blend: PEFT refuses two such adapters on one module and "
                         "gives a single one's blend a fresh copy of the base module, dropping the trained one")


class NoThinkingSwitch(ValueError):
    """Thinking was switched on or off for a template that has no such switch."""


@dataclass(frozen=True)
class PromptStyle:
    """How training turned a row into the model's input, so that a free prompt can be put the same way.

    format: the rows' format as formatted_dataset recorded it (detected when dataset.format is
    'auto'); template, system_prompt and reasoning: the dataset.template, dataset.system_prompt and
    dataset.reasoning settings.
    """

    format: str
    template: str = "auto"
    system_prompt: str | None = None
    # Thinking on or off where the template has the switch (Qwen3's enable_thinking); None: as in training.
    enable_thinking: bool | None = None
    reasoning: str = "auto"


def prompt_ids(tokenizer, prompt: str, style: PromptStyle) -> list[int]:
    """The prompt's token ids as training put a one-turn example up to where the answer starts."""
    return conversation_ids(tokenizer, [{"role": "user", "content": prompt}], style)


def conversation_ids(tokenizer, messages: list[dict], style: PromptStyle) -> list[int]:
    """A conversation's token ids up to where the next answer starts, put as training put its examples.

    messages: user and assistant turns, the last a user's (the system prompt is the style's). A chat
    template renders [system prompt,] the turns and the generation prompt, without added special
    tokens (the template writes its own BOS). Alpaca, prompt_completion and text rows were one turn
    each: one turn is put exactly as formatted_dataset put it (the Alpaca prompt with no input, or
    the prompt as is, with the tokenizer's special tokens). Training never saw a longer conversation
    in these formats, so one follows the template saved with the adapter for them (prompt_format:
    each earlier turn a whole training example closed by EOS), the one servers apply to it.
    """
    from lora_pipeline.ml.data.templates import alpaca_prompt, resolve_template
    from lora_pipeline.ml.prompt_format import prompt_template

    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a conversation to answer ends with a user turn")
    template = resolve_template(style.template, style.format, tokenizer.chat_template)
    switch = {} if style.enable_thinking is None else {"enable_thinking": style.enable_thinking}
    if switch and not (template.is_chat and "enable_thinking" in template.jinja):
        raise NoThinkingSwitch(f"the {template.name} template has no thinking switch (enable_thinking); leave thinking "
                               "as training had it")
    if not template.is_chat and len(messages) == 1:
        prompt = messages[0]["content"]
        text = alpaca_prompt(prompt, "", style.system_prompt) if style.format == "alpaca" else prompt
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    system = [{"role": "system", "content": style.system_prompt}] if style.system_prompt else []
    jinja = prompt_template(template, style.format, tokenizer)  # a chat template is itself
    text = tokenizer.apply_chat_template(system + messages, chat_template=jinja, tokenize=False,
                                         add_generation_prompt=True, **switch)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
