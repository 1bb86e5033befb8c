"""Training on several processes: the Dagster step's side (launch.py: torchrun through Dagster Pipes) and each
rank's (worker.py: `torchrun ... -m lora_pipeline.torchrun.worker SPEC`). What they run is ml/training."""
