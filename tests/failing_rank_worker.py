"""The training worker with rank 1 made to fail, for tests/test_distributed.py (not a test module)."""

import os
import sys

import lora_pipeline.torchrun.worker as worker

_train = worker._train


def _rank_one_fails(spec, folder, pipes=None):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1 was told to fail")
    return _train(spec, folder, pipes)


worker._train = _rank_one_fails

if __name__ == "__main__":
    sys.exit(worker.main())
