"""The preference objectives' parts of the stages (DPO, KTO, ORPO): the pairs formatted_dataset writes, the training
trained_adapter hands them to, and the held-out pairs eval_report scores. The stages themselves are declared once,
in data.py, training.py and evaluation.py beside this package, and branch here on training.objective."""
