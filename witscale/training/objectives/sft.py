"""SFT: the paper's weighted token loss Σ w·nll / N (docs/objective.md#formula) — the kernel's own loss, so
no head hook; the step divides by N of the run's --normalization."""
from __future__ import annotations

from witscale.training.objectives import register
from witscale.training.objectives.base import Objective


@register
class SFT(Objective):
    name = "sft"
    data_task = "sft"
    default_lr = 2e-5                # the paper's (Chatterjee et al. 2025)
    weight_ratio_invariant = True    # docs/objective.md#scale-and-clipping

    def check_data(self, manifest: dict, path: str, table, cfg, flag: str = "--data") -> None:
        # Preference data would make it imitate the rejected completions too.
        if manifest.get("task", "sft") != "sft":
            from witscale.training.objectives import registered
            pair = [c.name for c in registered() if c.data_task == manifest.get("task")]
            hint = f": train it with --objective {' or '.join(pair)}" if pair else ""
            raise ValueError(f"{flag} {path} is a {manifest.get('task')} dataset{hint}")

    def describe(self) -> str:
        return "the weighted token loss"
