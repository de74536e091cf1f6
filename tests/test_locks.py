"""One process at a time in a run folder and in a reproduction's output; a killed holder leaves no stale lock."""

import signal
import subprocess
import sys

import pytest

from limoe.cli import main
from limoe.locks import FolderInUse, folder_lock
from limoe.reproduce import reproduce
from limoe.train import train

from _train_utils import tiny_config


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    with folder_lock(tmp_path / "run", "limoe train"):
        with pytest.raises(FolderInUse, match=r"run is in use by limoe train \(pid \d+\)"):
            with folder_lock(tmp_path / "run", "limoe train"):
                pass
    with folder_lock(tmp_path / "run", "limoe train"):  # released on leaving
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from limoe.locks import folder_lock\n"
                               "with folder_lock(sys.argv[1], 'x'):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse):
            with folder_lock(tmp_path, "limoe train"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(tmp_path, "limoe train"):
        pass


def test_train_refuses_a_run_folder_in_use_before_writing_anything(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    with folder_lock(cfg.run_dir, "limoe train"):  # another trainer in this folder
        with pytest.raises(FolderInUse):
            train(cfg, progress=False)
        assert main(["train", "--config", str(config), "--no-progress"]) == 2
    assert f"{cfg.run_dir} is in use by limoe train (pid" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_reproduce_refuses_an_output_folder_in_use(tmp_path, capsys):
    with folder_lock(tmp_path, "limoe reproduce"):
        with pytest.raises(FolderInUse):
            reproduce("smoke", tmp_path, report=lambda line: None)
        assert main(["reproduce", "--scale", "smoke", "--out", str(tmp_path)]) == 2
    assert "is in use by limoe reproduce (pid" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_file_system_without_locks_works_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno

    from limoe import locks

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .No locks available."):
        with folder_lock(tmp_path, "limoe train"):
            pass
