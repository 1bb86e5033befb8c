"""Evaluation: the suite every model is scored on (suite.py), one model's per-example scores
(per_example.py), and base, adapters and merged model compared with intervals (pipeline.py)."""
