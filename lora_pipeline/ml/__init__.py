"""The machine-learning code, Dagster-free, with torch imported lazily; the assets call it.

Grouped by concern, named after the stages they serve:
- data/: reading sources (sources; one file by its kind: file_readers), row formats and their
  schemas (formats), templates, the loaded and checked rows (raw: raw_dataset), dropping empty
  rows and duplicates and the split (clean), rendering, tokenizing and splitting (formatted:
  formatted_dataset), and checks of the formatted data (quality).
- base/: the base model: the built-in tiny model (tiny), shapes (architectures), LoRA target
  modules (modules), device and dtypes (precision), quantizing (quantize), reloading it in full
  precision (loading), the memory plan (memory) and whether training fits (fit).
- training.py (trained_adapter), merge.py (merged_model), evaluation.py (eval_report).
- report/: the evaluation report (metrics_report), model cards (modelcard), plots.
- batches.py: token batches scored as training scores them, shared by training, merge and evaluation.
"""
