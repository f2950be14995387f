"""The resumable training loop (checkpoints, logs, learning-rate schedule) shared by lottery
tickets (`pruning/lottery.py`) and distillation."""
