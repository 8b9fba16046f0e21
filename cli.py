"""The command-line kit every script shares: one-line errors, checked flag types, device and dtype choice,
atomic file writes and the interactive prompt."""
import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import warnings

import torch


class PionError(Exception):
    """A problem with what the user gave us (a file, a flag, data): reported as one line, exit code 2."""


def run_cli(main):
    """Run a script's main(); a PionError becomes one line on stderr and exit code 2, not a traceback."""
    try:
        main()
    except PionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def first_line(error):
    """An exception as one line of text, for error messages that must stay one line."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, unless the flag's help already says what its default is."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (a PionError for run_cli), not usage + error,
    and whose --help shows every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise PionError(f"{message} (see --help)")


def checked(kind, is_valid, valid_values):
    """An argparse `type`: text -> kind(text) if finite and is_valid, else ArgumentTypeError naming what is valid."""

    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or not is_valid(value):
            raise argparse.ArgumentTypeError(f"must be {valid_values}, got {text!r}")
        return value

    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = checked(float, lambda v: v >= 0, "a finite number >= 0")


def dataclass_from_args(cls, args, **values):
    """cls (a dataclass) from the parsed flags named like its fields; `values` fill or override fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **values})


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(parser):
    """The flags of every script that loads a model: tokenizer, device, dtype, quantize (quantize.quantize
    applies it to checkpoint.load_model's model)."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer, fetched once)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights' dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="CPU inference with int8 weights (a scale per output channel) or int4 (llama.cpp's "
                        "Q4_0: a scale per 32 weights); see quantize.py")


def add_inference_args(parser):
    """The flags of every script that decodes with a model: add_model_args's and compile."""
    add_model_args(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-token decode step")


def pick_device(name="auto"):
    """auto: cuda, else mps, else cpu. An unavailable device is a PionError, not a crash mid-load."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PionError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise PionError(f"device {name} is not available on this machine")
    return device


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a hidden temp path beside `path` (for a file or a folder), renamed to `path` when the block ends
    without an error: a crash never leaves half a file or folder under the final name. An OSError (a full
    disk, a read-only or missing folder) becomes one line naming `path`, and what was there is untouched."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
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


def use_one_line_warnings(category):
    """Warnings as `warning: ...` lines; those of `category` every time (not once per call site)."""
    warnings.simplefilter("always", category)
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def human_count(n):
    """12,345 -> '12.3k', 4,500,000 -> '4.5M': readable at every scale of a run."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def is_unicode(text):
    """False for a str holding a lone surrogate (JSON can spell one, "\\ud800"), which no encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_text(text):
    """Text the tokenizer can take: bytes that were not UTF-8 (Python keeps them in argv and stdin as lone
    surrogates) become U+FFFD, as any other invalid UTF-8 does when decoded."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (e.g. from JSON "\ud800")
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def typed_lines(prompt=">>> "):
    """Lines typed at an interactive prompt, until Ctrl-D. Ctrl-C at the prompt starts a fresh line, as in
    the Python REPL (during an answer, the caller catches it). A line that is not valid UTF-8 is kept
    (with U+FFFD for its bad bytes), not a crash that ends the session."""
    if sys.stdin.isatty():
        # readline reads keys itself: line editing, history, and no 4095-character cut of a long paste by
        # the terminal's line discipline.
        import readline  # noqa: F401
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            yield valid_text(input(prompt))
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
