"""Training: the DeepSpeed loop, checkpoints in the SAT layout, learning-rate schedule, data order."""
