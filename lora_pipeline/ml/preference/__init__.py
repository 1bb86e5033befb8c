"""Preference tuning (DPO) with LoRA: pairs of answers rendered with the model's template, trained with TRL's
DPOTrainer from a starting adapter kept frozen as the reference, and scored by whether the model ranks the
chosen answer above the rejected one. Dagster-free; torch, transformers and TRL are imported lazily."""
