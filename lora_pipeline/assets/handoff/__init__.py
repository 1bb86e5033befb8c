"""The on-demand hand-off stages: what users take a model away with (the Hub, GGUF files), run only when asked."""
