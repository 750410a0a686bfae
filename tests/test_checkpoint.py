"""kvslim.checkpoint: the one writer of model directories — refusals, atomic replacement, crash safety.

The kill tests run a writer in a subprocess that SIGKILLs itself at each stage of a write
(``KVSLIM_CRASH_AT``), with and without ``renameat2(RENAME_EXCHANGE)``, and check that the old
or the new directory is complete under its name after the next ``recover``, that carried-over
sub-directories (training's ``run/``) survive, and that no hidden leftovers remain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvslim.checkpoint import check_output, is_model_dir, load_tensors, read_config, recover, write_model_dir


def _write(path, value: float, **kw) -> Path:
    return write_model_dir(path, tensors={"w": torch.full((4,), value)}, config={"value": value}, **kw)


def _value(path) -> float:
    return read_config(path)["value"]


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".kvslim-" in p.name)


def test_write_read_roundtrip_and_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = _write(tmp_path / "m", 1.0, files={"notes.txt": "hi"})
    finally:
        os.umask(old)
    assert _value(out) == 1.0 and torch.equal(load_tensors(out)["w"], torch.ones(4))
    assert (out / "notes.txt").read_text() == "hi" and is_model_dir(out)
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    assert not _hidden(tmp_path)


def test_existing_output_needs_force_and_force_replaces_only_model_dirs(tmp_path):
    out = _write(tmp_path / "m", 1.0)
    (out / "stale.json").write_text("{}")
    with pytest.raises(ValueError, match="exists and is not empty; pass --force"):
        _write(out, 2.0)
    _write(out, 2.0, force=True)
    assert _value(out) == 2.0 and not (out / "stale.json").exists()  # nothing of the old one mixes in
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", 3.0)  # an existing empty directory is fine
    home = tmp_path / "models"
    _write(home / "a", 1.0)
    (home / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a model directory"):
        _write(home, 5.0, force=True)  # `--out ~/models --force` must not wipe every model there
    assert (home / "notes.txt").read_text() == "keep me" and _value(home / "a") == 1.0
    with pytest.raises(ValueError, match="contains the source"):
        _write(home, 5.0, force=True, sources=(home / "a",))
    with pytest.raises(ValueError, match="is the source"):
        _write(home / "a", 5.0, force=True, sources=(home / "a",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _write(tmp_path / "file", 1.0)


def test_unwritable_and_full_outputs_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="not writable"):
        check_output("/proc/kvslim-test-out")
    with pytest.raises(ValueError, match="GB free"):
        check_output(tmp_path / "big", expected_bytes=10**18)


def test_bad_files_are_named(tmp_path):
    out = _write(tmp_path / "m", 1.0)
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"model\.safetensors .*not a readable safetensors file"):
        load_tensors(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        read_config(out)
    (out / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_config(out)
    with pytest.raises(ValueError, match="does not exist"):
        read_config(tmp_path / "nope")


def test_leftovers_of_dead_writers_are_removed_and_reported(tmp_path, capsys):
    out = _write(tmp_path / "m", 1.0)
    stale = tmp_path / ".m.kvslim-partial-999999999-abcd"  # a pid that cannot be alive
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    _write(out, 2.0, force=True)
    assert not _hidden(tmp_path) and _value(out) == 2.0
    assert "removed" in capsys.readouterr().err


_CHILD = """
import sys, torch
from kvslim.checkpoint import write_model_dir
path, value = sys.argv[1], float(sys.argv[2])
write_model_dir(path, tensors={"w": torch.full((4,), value)}, config={"value": value}, keep=("run",), force=True)
"""


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("stage", ["partial", "staged", "kept", "moved-old", "swapped"])
def test_kill_at_every_stage_leaves_old_or_new_complete(tmp_path, stage, exchange):
    if exchange and stage == "moved-old":
        pytest.skip("the two-rename stage exists only without RENAME_EXCHANGE")
    out = _write(tmp_path / "m", 1.0)
    (out / "run").mkdir()
    (out / "run" / "checkpoint.pt").write_text("training state")
    env = dict(os.environ, KVSLIM_CRASH_AT=stage, KVSLIM_NO_EXCHANGE="0" if exchange else "1")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(out), "2.0"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    recover(out)  # what the next command touching `out` does first
    assert _value(out) in (1.0, 2.0) and torch.equal(load_tensors(out)["w"], torch.full((4,), _value(out)))
    if stage == "partial":
        assert _value(out) == 1.0  # the new one never completed
    else:
        assert _value(out) == 2.0  # a complete staged write is finished, not thrown away
    assert (out / "run" / "checkpoint.pt").read_text() == "training state"
    assert not _hidden(tmp_path), _hidden(tmp_path)


def test_kill_without_previous_output(tmp_path):
    env = dict(os.environ, KVSLIM_CRASH_AT="partial")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "new"), "1.0"], env=env, timeout=120)
    assert p.returncode == -signal.SIGKILL
    recover(tmp_path / "new")
    assert not (tmp_path / "new").exists() and not _hidden(tmp_path)
    check_output(tmp_path / "new")  # free to write


def test_model_save_pretrained_goes_through_the_writer(tmp_path):
    from kvslim.model import Transformer
    from kvslim.testing import tiny_model, tiny_spec

    m = tiny_model(tiny_spec("gla-2"))
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="--force"):
        m.save_pretrained(tmp_path / "m")
    m.save_pretrained(tmp_path / "m", force=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "kvslim-1"
    back = Transformer.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(back(x), m(x))
