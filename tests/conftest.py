"""Shared fixtures. Tests make their own data; nothing here reads ../shared."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- data pipeline
@pytest.fixture(scope="session")
def synthetic_records():
    from witscale.data.synthetic import generate_instruction_records
    return generate_instruction_records(400, seed=0, multi_turn_fraction=0.2)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory, synthetic_records):
    """A small BPE SentencePiece model (unk=0, bos=1, eos=2, pad=3; chat specials as user symbols)."""
    from witscale.data.synthetic import train_sentencepiece
    texts = []
    for r in synthetic_records:
        if "messages" in r:
            texts += [m["content"] for m in r["messages"]]
        else:
            texts += [r["instruction"], r["input"], r["output"]]
    texts += ["Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\n### Input:\n### Response:\n", "system user assistant",
              "Be brief. Hello there, how are you? Fine, thanks."]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("sp")), vocab_size=600)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_path):
    from witscale.data.tokenizer import load_tokenizer
    return load_tokenizer(sp_model_path)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return str(path)


# ------------------------------------------------------------------------------------------- test tiers
# `make test-fast` (pytest -m "not slow") deselects the `slow` tier; the guard in tests/tiers.py fails a test
# that starts ranks without the marker.
def pytest_configure(config):
    # Registered here rather than in setup.cfg's markers: the Makefile's install stamp depends on setup.cfg.
    config.addinivalue_line("markers", "slow: starts ranks (gloo harness, torchrun, the DeepSpeed launcher, mpirun, "
                                       "Slurm), trains through the CLI, runs the demo or a benchmark; "
                                       "`make test-fast` deselects it")
    from tests import tiers
    tiers.install()


# `make test` runs the tests in parallel worker processes (pytest-xdist, --dist loadgroup). What is one per
# machine is serialized by putting its tests into one group, run by one worker in order: the local Slurm (one
# cluster, started and stopped by a session fixture — a session per worker) and mpirun (a fixed rendezvous port of
# its own, below the ephemeral range, see tests/test_mpi.py) share the group "slurm-mpi".
SERIAL_GROUPS = {"slurm-mpi": ("test_slurm.py", "test_slurm_values.py", "test_mpi.py")}


def serial_group(nodeid: str) -> str | None:
    """The serial group of a test, from its file (the part of its node id before '::')."""
    name = os.path.basename(nodeid.split("::", 1)[0])
    return next((group for group, files in SERIAL_GROUPS.items() if name in files), None)


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup with SERIAL_GROUPS as the groups. xdist's own way — an xdist_group marker, which its worker
    turns into a '@group' suffix of the node id — does nothing under pytest 9 (xdist 3.8.0 sets item._nodeid, which
    pytest 9 no longer reads): every Slurm test went to whichever worker was free, so 2-3 of them ran at once on the
    2 local nodes (and each worker started the cluster, the first to finish stopping it) — the "load" failures of
    issue 26. The controller sees only node ids, so the groups are by file."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class SerialGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_group(nodeid) or super()._split_scope(nodeid)

    return SerialGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    serial = {item.nodeid for item in items if serial_group(item.nodeid)}
    strays = [item.nodeid for item in items if item.nodeid not in serial
              and "slurm_cluster" in getattr(item, "fixturenames", ())]
    if strays:
        raise pytest.UsageError(f"{strays[0]} uses the local Slurm (slurm_cluster) but its file is not in "
                                f"tests/conftest.py's SERIAL_GROUPS: it would run beside the other Slurm tests")
    # A group is one worker's queue from its first test on, and the Slurm group is the longest one (under load
    # about half of the suite's wall time): started first, the other workers share the rest beside it instead of
    # waiting for it at the end. Stable: the order within and outside the groups is unchanged.
    items.sort(key=lambda item: item.nodeid not in serial)


@pytest.fixture(autouse=True)
def slurm_jobs(request):
    """Around every test that uses the local Slurm (the `slurm_cluster` fixture): it starts on idle nodes (else it
    fails at once, naming what holds them), and when it ends — passed or failed — the jobs it submitted (those
    slurmctld did not know before it) are cancelled and the nodes are idle again before the next test; a job
    that would not go away fails this test's teardown, naming it (tests/slurm_helpers.py)."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    from tests import slurm_helpers as sh
    env = sh.slurm_env(request.getfixturevalue("slurm_cluster"))
    with sh.jobs_cancelled_at_exit(env, request.node.name):
        yield


def pytest_unconfigure(config):
    from tests import tiers
    tiers.uninstall()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    from tests import tiers
    with tiers.running(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    from tests import tiers
    outcome = yield
    tiers.fail_report_of_a_refused_launch(item, call, outcome.get_result())
