"""files.py: a file or folder is either complete under its name or not there; a failed write is one line."""
import os

import pytest

from cli import PionError
from files import atomic_write, check_new_folder, replaced_atomically, write_folder_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(PionError, match=f"^cannot write {path}: No space left on device$"):
        atomic_write(str(path), write)
    assert os.listdir(tmp_path) == ["model.pt"] and path.read_bytes() == b"old"


def test_a_write_error_that_a_library_wrapped_is_still_one_line(tmp_path):
    """torch and safetensors raise their own exceptions around the OS's error; its text still names it."""
    def write(f):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos: file write failed")

    with pytest.raises(PionError, match="^cannot write .*file write failed$"):
        atomic_write(str(tmp_path / "model.pt"), write)
    assert os.listdir(tmp_path) == []


def test_any_other_error_while_writing_is_not_disguised_as_a_write_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(str(tmp_path / "x"), lambda f: 1 / 0)
    assert os.listdir(tmp_path) == []


def test_an_input_error_raised_while_writing_keeps_its_own_line(tmp_path):
    """A PionError from reading an input inside a write (here raised while handling the OSError that caused
    it) names that input, not the file being written."""
    with pytest.raises(PionError, match="^cannot read the dataset: offline$"):
        with replaced_atomically(str(tmp_path / "out")):
            try:
                raise OSError("network unreachable")
            except OSError:
                raise PionError("cannot read the dataset: offline")
    assert os.listdir(tmp_path) == []


def test_a_folder_appears_whole_in_place_of_an_empty_one(tmp_path):
    out = tmp_path / "export"
    out.mkdir()

    def write(folder):
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{}")
        return "written"

    assert write_folder_atomically(str(out), write) == "written"
    assert os.listdir(out) == ["config.json"] and os.listdir(tmp_path) == ["export"]


def test_an_out_folder_that_holds_anything_is_refused(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(PionError, match="already exists and is not an empty folder"):
        check_new_folder(str(tmp_path))
    check_new_folder(str(tmp_path / "new"))  # a new path is fine


def finished_process_id():
    """The id of a process that has ended (as one killed mid-write has)."""
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_write_removes_the_leftovers_of_killed_writers_of_its_path_only(tmp_path):
    import subprocess
    import sys
    dead = tmp_path / f".out.tmp{finished_process_id()}"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.tmp{finished_process_id()}").write_bytes(b"half a file")
    other = tmp_path / f".other.tmp{finished_process_id()}"  # another path's: its own next write removes it
    other.write_bytes(b"half")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.tmp{alive.pid}"  # a write still under way in another process
        running.mkdir()
        atomic_write(str(tmp_path / "out"), lambda f: f.write(b"whole"))
        assert sorted(os.listdir(tmp_path)) == sorted([other.name, running.name, "out"])
    finally:
        alive.kill()
        alive.wait()


def test_a_leftover_with_this_process_s_own_id_is_an_earlier_process_s_and_goes(tmp_path):
    """Process ids are reused: a temporary under our id that exists before our write began is not ours."""
    reused = tmp_path / f".out.tmp{os.getpid()}"
    reused.mkdir()
    (reused / "shard_00000.npy").write_bytes(b"half a shard")
    write_folder_atomically(str(tmp_path / "out"), lambda folder: None)
    assert sorted(os.listdir(tmp_path)) == ["out"]
