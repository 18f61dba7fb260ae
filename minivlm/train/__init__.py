"""Training: stages, optimiser and schedule, precision, checkpoints, data stream, DDP/FSDP2, LoRA."""
