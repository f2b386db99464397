"""witscale: distributed Weighted Instruction Tuning (WIT) on DeepSpeed."""

__version__ = "0.1.0"
