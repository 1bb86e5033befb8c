"""Scores of answers (text.py) and how sure a comparison of two models is (paired.py). Dagster-free."""
