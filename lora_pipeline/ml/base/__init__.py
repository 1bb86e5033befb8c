"""The base model and its device: built-in models, shapes, target modules, dtypes, quantizing, reloading, memory plans."""
