"""Distillation: KD/KL/JSD and hidden-state losses, tasks for LMs, encoders and classifiers, and a resumable trainer (safetensors checkpoints, torchrun DDP)."""
