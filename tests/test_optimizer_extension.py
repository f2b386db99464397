"""The optimizer's compiled extension cannot hang a job (witscale/training/optim.py ``prepare_optimizer``): a
stale torch FileBaton lock is named and a fresh build directory used, a build (or a live lock) is bounded by a
timeout with a one-line error, and a node that cannot build DeepSpeed's FusedAdam trains with torch's AdamW."""
from __future__ import annotations

import logging
import os
import time

import pytest

from witscale.training import optim


def _lock_dir(root, age_s: float, extra_file_age_s: float | None = None):
    d = root / "fused_adam"
    d.mkdir(parents=True)
    lock = d / "lock"
    lock.write_text("")
    old = time.time() - age_s
    os.utime(lock, (old, old))
    if extra_file_age_s is not None:
        f = d / "fused_adam.o"
        f.write_text("x")
        t = time.time() - extra_file_age_s
        os.utime(f, (t, t))
    return d


def test_a_stale_lock_is_found_and_a_live_build_is_not(tmp_path):
    assert optim.stale_build_lock(str(_lock_dir(tmp_path / "a", 3600)), 600) == str(tmp_path / "a/fused_adam/lock")
    assert optim.stale_build_lock(str(_lock_dir(tmp_path / "b", 30)), 600) is None          # a build just began
    # an old lock, but the builder wrote an object file a minute ago: still building
    assert optim.stale_build_lock(str(_lock_dir(tmp_path / "c", 3600, extra_file_age_s=60)), 600) is None
    (tmp_path / "d").mkdir()
    assert optim.stale_build_lock(str(tmp_path / "d"), 600) is None                         # no lock at all


def test_prepare_names_a_stale_lock_and_builds_in_a_fresh_directory(tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    _lock_dir(shared, 7200)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(shared))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    monkeypatch.setattr(optim, "fused_adam_prebuilt", lambda: False)
    monkeypatch.setattr(optim, "missing_build_tools", lambda: [])
    built = []
    monkeypatch.setattr(optim, "_build_in_child", lambda d, t: built.append(d))
    config = {"optimizer": {"type": "AdamW", "params": {}}, "zero_optimization": {"stage": 3}}
    with caplog.at_level(logging.WARNING, logger="witscale"):
        chosen, why = optim.prepare_optimizer(config, logging.getLogger("witscale"))
    assert why is None and chosen == config
    fresh = str(tmp_path / "node-tmp" / "witscale-ext-4242")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == fresh
    assert built == [os.path.join(fresh, "fused_adam")]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(shared / "fused_adam" / "lock") in lines[0] and fresh in lines[0], lines


@pytest.mark.slow  # waits out a lock timeout
def test_a_build_held_by_a_live_lock_fails_in_one_line_after_the_timeout(tmp_path, monkeypatch):
    """The real child build (torch's JIT load) waits on a lock another process holds; the timeout ends it."""
    _lock_dir(tmp_path, 0)                              # fresh: a live builder elsewhere, never finishing
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("WITSCALE_EXT_BUILD_TIMEOUT_S", "20")
    monkeypatch.setattr(optim, "missing_build_tools", lambda: [])
    config = {"optimizer": {"type": "AdamW", "params": {}}, "zero_optimization": {"stage": 3}}
    with pytest.raises(optim.ExtensionBuildError) as e:
        optim.prepare_optimizer(config)
    assert "\n" not in str(e.value) and str(tmp_path / "fused_adam") in str(e.value) and "20 s" in str(e.value)


def test_which_configs_build_fused_adam():
    zero3 = {"optimizer": {"type": "AdamW", "params": {}}, "zero_optimization": {"stage": 3}}
    assert optim.wants_fused_adam(zero3)
    assert not optim.wants_fused_adam({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 0}})
    assert optim.wants_fused_adam({"optimizer": {"type": "AdamW"}, "bf16": {"enabled": True}})
    assert not optim.wants_fused_adam({**zero3, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert not optim.wants_fused_adam({"zero_optimization": {"stage": 3}})
    assert not optim.wants_fused_adam({**zero3, "zero_optimization": {"stage": 3, "offload_optimizer":
                                                                      {"device": "cpu"}}})


def test_a_node_without_a_compiler_takes_torch_adamw(monkeypatch):
    """No nvcc/ninja/c++: the config loses its "optimizer" (the Trainer then builds torch's fused AdamW from the
    flags) and the reason names what is missing. (On the CPU fill_ds_config already drops DeepSpeed's optimizer:
    the CPU path builds no optimizer extension, so this is checked on the function.)"""
    monkeypatch.setenv("CXX", "/no/such/c++")
    monkeypatch.setattr(optim, "fused_adam_prebuilt", lambda: False)
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "zero_optimization": {"stage": 3}}
    chosen, why = optim.prepare_optimizer(config)
    assert chosen == {"zero_optimization": {"stage": 3}}
    assert why.startswith("cannot build DeepSpeed's FusedAdam here") and "/no/such/c++" in why
