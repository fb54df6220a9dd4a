"""Ctrl-C during ``adfed train``: a real process, a real SIGINT, then the printed resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from adfed.cli import app
from adfed.fl.checkpoint import CHECKPOINT


def test_ctrl_c_keeps_the_checkpoint_writes_the_config_and_prints_the_resume_command(small_world: Path,
                                                                                     tmp_path: Path) -> None:
    # Prepare: a long federated run in its own process
    out = tmp_path / "run"
    small = ["--set", "model.tower=[32,16]", "--set", "model.embedding_dim=8", "--set", "fl.clients_per_round=12",
             "--set", "window.min_clients=3", "--set", "fl.eval_every=1000", "--set", "data.max_test_users=300"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "adfed.cli", "train", "--mode", "federated", "--data",
                             str(small_world), "--out", str(out), "--rounds", "500", *small],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # Execute: interrupt once a round is checkpointed
    deadline = time.monotonic() + 180
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)

    # Assert: exit 130, the config beside the checkpoint, the exact command, no traceback
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert (out / CHECKPOINT).exists() and (out / "config.toml").exists()
    command = re.search(r"adfed train --config (\S+) --out (\S+) --resume", stderr)
    assert command and command.group(1) == str(out / "config.toml") and command.group(2) == str(out)
    assert not (out / "summary.json").exists()

    # ... and the printed command continues the run (to a nearer end, to keep the test short)
    from adfed.fl import checkpoint

    done = checkpoint.load(out / CHECKPOINT).state.round
    result = CliRunner().invoke(app, ["train", "--config", command.group(1), "--out", command.group(2),
                                      "--resume", "--rounds", str(done + 1)])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").exists()
