"""Training: the DeepSpeed engines behind one Trainer, the run configuration, the optimizer and schedule,
process groups, checkpoints, preemption, metrics and export (docs/data-flow.md)."""
