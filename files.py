"""Files written so that nothing is ever half there: a file or folder is written under a hidden temporary
name beside its destination and renamed into place when complete (checkpoints, tokenizer, metrics, exports,
data sets). A failed write is one line naming the file; what was there before is untouched."""
import contextlib
import glob
import os
import shutil

from cli import PionError, first_line


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a hidden temp path beside `path` (for a file or a folder), renamed to `path` when the block ends
    without an error: a crash never leaves half a file or folder under the final name. An OSError (a full
    disk, a read-only or missing folder) becomes one line naming `path`, and what was there is untouched."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
    remove_leftovers(directory, glob.escape(name))
    try:
        yield tmp
        os.replace(tmp, path)
    except PionError:
        raise  # already one line naming its own problem (a bad input read while writing, an inner write)
    except OSError as e:
        raise PionError(f"cannot write {path}: {e.strerror or first_line(e)}")
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise PionError(f"cannot write {path}: {reason}")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def remove_leftovers(directory, name_pattern, all_stale=False):
    """Remove the temporaries replaced_atomically left in directory, for names matching name_pattern (a glob),
    when the process writing them was killed (SIGKILL, a power cut): those whose process is gone, or all of
    them with all_stale (the caller holds the folder's lock: no one else is writing there)."""
    for leftover in glob.glob(os.path.join(glob.escape(directory), f".{name_pattern}.tmp*")):
        pid = leftover.rsplit(".tmp", 1)[1]
        # Our own pid's is a leftover too: it was written before this write began, by an earlier process that had
        # the same id.
        if all_stale or (pid.isdigit() and (int(pid) == os.getpid() or not process_exists(int(pid)))):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)  # another run may be removing it too
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(leftover)


def process_exists(pid):
    if pid <= 0:
        return True  # not a process id (kill(0) would signal our own group): leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


# How the OS's write errors read once torch (RuntimeError) or safetensors (SafetensorError) have wrapped them
# in exceptions of their own, without the OSError.
WRITE_ERRORS = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
                "Input/output error", "file write failed", "(os error")


def write_failure(error):
    """Why a write failed, when `error` is a failed write that a library wrapped (an OSError in its chain, or
    the OS's message in its text); None for any other error."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.strerror or first_line(cause)
        cause = cause.__cause__ or cause.__context__
    text = first_line(error)
    return text if any(marker in text for marker in WRITE_ERRORS) else None


def atomic_write(path, write, durable=False):
    """write(binary file) into a file that replaced_atomically renames to `path`. durable: fsync before the
    rename (checkpoints)."""
    with replaced_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def check_new_folder(out):
    """Refuse an --out that holds anything: an export or a data set never overwrites what is there. Checked
    before the slow work, and again by write_folder_atomically's rename."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise PionError(f"--out {out} already exists and is not an empty folder; choose a new path (nothing is "
                        f"ever overwritten)")


def write_folder_atomically(out, write):
    """write(folder) into a staging folder that replaced_atomically renames to `out` (which must be new or an
    empty folder). Returns what write returns."""
    out = os.path.abspath(out)
    with replaced_atomically(out) as staging:
        os.makedirs(staging)
        result = write(staging)
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # empty: the rename puts the new folder there (and refuses one that filled up meanwhile)
    return result
