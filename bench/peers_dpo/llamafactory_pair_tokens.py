"""LLaMA-Factory's own tokenization of a preference dataset (stage rm, as its DPO workflow loads it), without training.

Run with the LLaMA-Factory venv's python, offline:
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python llamafactory_pair_tokens.py RUN.yaml DATASET OUT.json
Writes, per pair and in the file's order: prompt_ids (the positions its labels ignore), chosen_ids and
rejected_ids (the answer tokens after the prompt, as it trains on them, after cutoff_len), and
real_tokens: the non-pad tokens of the chosen and rejected sequences (prompt included, counted twice, as the
model sees them). Prints one JSON line with the counts.
"""
import json, sys, tempfile
import yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

IGNORE_INDEX = -100
args = yaml.safe_load(open(sys.argv[1]))
args["dataset"] = sys.argv[2]
args["output_dir"] = tempfile.mkdtemp()  # a fresh, empty output dir: nothing is trained or written there
model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
tm = load_tokenizer(model_args)
tok = tm["tokenizer"]
template = get_template_and_fix_tokenizer(tok, data_args)
ds = get_dataset(template, model_args, data_args, training_args, stage="rm", **tm)["train_dataset"]
out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
for row in ds:
    prompt_len = sum(1 for label in row["chosen_labels"] if label == IGNORE_INDEX)
    out["prompt_ids"].append(row["chosen_input_ids"][:prompt_len])
    out["chosen_ids"].append(row["chosen_input_ids"][prompt_len:])
    out["rejected_ids"].append(row["rejected_input_ids"][prompt_len:])
real = sum(len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) for row in ds)
out["real_tokens"] = real
json.dump(out, open(sys.argv[3], "w"))
print(json.dumps({"pairs": len(ds), "real_tokens": real}))
