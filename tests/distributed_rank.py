"""One rank of the distributed-training tests (run under torchrun): train_adapter with a launch, its result
written to OUT/rank-RANK.json. Not a test module: tests/test_distributed.py starts it."""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from lora_pipeline.config.schema import LoraSettings, TrainingSettings
from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.training import train_adapter
from lora_pipeline.ml.training.distributed import Launch

base, train_file, out, batch, nproc, nnodes = sys.argv[1:7]
launch = Launch("ddp" if int(nproc) * int(nnodes) > 1 else "none", int(nproc), int(nnodes))
training = TrainingSettings(max_steps=4, batch_size=int(batch), max_length=96, warmup=0.0, checkpoint_every=0,
                            logging_steps=1, learning_rate=3e-3)
result = train_adapter(Path(base), pd.read_parquet(train_file), Path(out) / "adapter", LoraSettings(r=4, alpha=8, dropout=0.0),
                       training, DeviceInfo("cpu"), "micro", launch=launch)
Path(out, f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(asdict(result)))
