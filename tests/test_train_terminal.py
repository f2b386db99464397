"""On a terminal the progress bars (train, eval) and the log lines never share a line: logs go through tqdm's
writer while a bar lives. The real CLI, one CPU process, under a pseudo-terminal."""
import errno
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_config_file import _flags, _settings, inputs  # noqa: F401 (fixture)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_in_pty(args):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))     # a 160-column terminal
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", COLUMNS="160",
               TERM="xterm")
    proc = subprocess.Popen([sys.executable, "witscale/train.py", *args], cwd=REPO_ROOT, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as e:        # EIO: the child closed the terminal
            if e.errno != errno.EIO:
                raise
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_log_lines_never_share_a_line_with_a_bar(inputs, tmp_path):  # noqa: F811
    settings = {**_settings(inputs), "max_steps": 4}
    out = _run_in_pty(_flags(settings) + ["--output-dir", str(tmp_path / "run"), "--eval-data", inputs["train"],
                                          "--eval-steps", "2"])
    segments = [ANSI.sub("", s).strip() for s in re.split(r"[\r\n]", out)]
    logs = [s for s in segments if "[witscale]" in s]
    bars = [s for s in segments if re.search(r"^(train|eval):.*\|", s)]
    assert any("packed attention backend" in s for s in logs), out      # logged while the train bar lives
    for s in logs:
        assert s.startswith("[witscale]") and "it/s" not in s and "step/s" not in s and "%|" not in s, repr(s)
    assert any("eval_loss" in s for s in logs), out
    assert any(s.startswith("train:") and "tok_s=" in s and "<" in s for s in bars), out   # ETA and tokens/s
    assert any(s.startswith("eval:") for s in bars), out                 # an evaluation bar
