"""Datasets: reading sources, checking rows against their format, templates, cleaning, tokenizing, splitting."""
