"""The command-line kit every script shares: one-line errors, checked flag types, run recipes (--config), device
and dtype choice and the interactive prompt."""
import argparse
import contextlib
import dataclasses
import importlib
import math
import signal
import sys
import tomllib
import warnings

import torch


class PionError(Exception):
    """A problem with what the user gave us (a file, a flag, data): reported as one line, exit code 2."""


def run_cli(main):
    """Run a script's main(); a PionError becomes one line on stderr and exit code 2, not a traceback, and
    Ctrl-C (or SIGTERM within stop_signals_raise) one line and the shell's code for it, 130 (143) (every
    `finally` on the way out has removed what was half-written)."""
    try:
        main()
    except PionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
        sys.exit(128 + signum)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program is, so that every `finally` on the way out removes what was
    half-written (a KeyboardInterrupt: no `except Exception` on the way takes it for an error of its own)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise():
    """Within the block, SIGINT (Ctrl-C) and SIGTERM (kill, a job scheduler; by default it ends the process on
    the spot, past every `finally`) raise Stopped once; a second signal is ignored so that the cleanup the
    first started runs to its end. The previous handlers are back after the block."""
    def stop(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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

    def parse_known_args(self, args=None, namespace=None):
        """Also reads --config FILE.toml, a run recipe, first: its values become the flags' defaults, so flags
        on the command line win. A parser with subcommands leaves the recipe to the subcommand's parser."""
        args = sys.argv[1:] if args is None else list(args)
        if self._subparsers is None:
            if "--config" not in self._option_string_actions:
                self.add_argument("--config", metavar="FILE.toml", help="a run recipe: a TOML file whose keys are "
                                  "this command's flags without the -- (see configs/); flags given here win "
                                  "(default: none)")
            path = recipe_path(args)
            if path is not None:
                self.use_recipe(path)
        return super().parse_known_args(args, namespace)

    def use_recipe(self, path):
        try:
            with open(path, "rb") as f:
                recipe = tomllib.load(f)
        except OSError as e:
            raise PionError(f"cannot read --config {path}: {e.strerror or first_line(e)}")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise PionError(f"--config {path} is not TOML: {first_line(e)}")
        for key, value in recipe.items():
            action = self._option_string_actions.get(f"--{key}")
            if action is None or key in ("config", "help"):
                raise PionError(f"--config {path}: {key!r} is not a flag of {self.prog} (the keys are its flags "
                                f"without the --; see --help)")
            self.set_defaults(**{action.dest: recipe_value(action, value, f"--config {path}: {key}")})
            action.required = False  # given by the recipe
            for group in self._mutually_exclusive_groups:
                if action in group._group_actions:
                    group.required = False


def recipe_path(args):
    """The value of --config in args, or None."""
    for i, token in enumerate(args):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(args):
            return args[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def recipe_value(action, value, where):
    """A recipe's TOML value for the flag `action`, checked as the flag's own text would be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise PionError(f"{where} is a switch: true or false, got {value!r}")
        return action.const if value else action.default

    def one(item):
        if isinstance(item, (bool, dict, list)):
            raise PionError(f"{where} must be a {'list of ' if many else ''}number or string, got {item!r}")
        try:
            converted = action.type(str(item)) if action.type else str(item)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise PionError(f"{where} {first_line(e)}")
        if action.choices is not None and converted not in action.choices:
            raise PionError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {item!r}")
        return converted

    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if many:
        return [one(item) for item in (value if isinstance(value, list) else [value])]
    return one(value)


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


def import_optional(module, needed_by, package):
    """`module`, which needs an optional package (lm-eval, matplotlib), imported only when a feature asks for it:
    the rest never needs the package. Missing, a PionError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PionError(f"{needed_by} needs {package} ({e}): pip install {package}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(parser):
    """The flags of every script that loads a model: tokenizer, device, dtype, quantize (quantize.quantize
    applies it to checkpoint.load_model's model)."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer, fetched once)")
    add_device_arg(parser)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights' dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="CPU inference with int8 weights (a scale per output channel) or int4 (llama.cpp's "
                        "Q4_0: a scale per 32 weights); see quantize.py")


def add_device_arg(parser):
    """--device, the same in every script: pick_device reads it (an unknown or absent device is one line)."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")


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
