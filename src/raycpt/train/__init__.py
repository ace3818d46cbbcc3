"""Training: the Ray Train worker loop, its DeepSpeed engine and LR schedules, and the launcher."""
