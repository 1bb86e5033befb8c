"""`python -m lora_pipeline.cli`: the same as the `lora-pipeline` command."""

import sys

from lora_pipeline.cli import main

sys.exit(main())
