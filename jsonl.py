"""The one reader of JSON Lines files (a JSON object per line): your .jsonl text for data_prep.py, chat data for
sft_data.py, and a run's metrics.jsonl. Strict, so that a bad line is named by its number rather than read
as something else: UTF-8 only (a byte order mark at the start is allowed), no lone surrogates."""
import json
import re

from cli import PionError, is_unicode

BYTE_ORDER_MARK = b"\xef\xbb\xbf"  # what some Windows editors put before UTF-8 text
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON spells half of a surrogate pair


def jsonl_objects(path, torn_end_ok=False):
    """(line number, dict) for each non-blank line of the JSON Lines file at `path`, read a line at a time.
    A line that is not UTF-8, not JSON, not an object or holds a lone surrogate (an escape such as \\ud800,
    which no text encoder takes) is a PionError naming it. torn_end_ok: a last line without its newline (a
    writer cut short by a crash) that does not parse is left out instead."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(BYTE_ORDER_MARK):
                    raw = raw[len(BYTE_ORDER_MARK):]
                try:
                    value = parse_line(raw)
                except PionError as e:
                    if torn_end_ok and not raw.endswith(b"\n"):
                        return
                    raise PionError(f"{path}:{number} {e}")
                if value is not None:
                    yield number, value
    except OSError as e:
        raise PionError(f"cannot read {path}: {e.strerror or e}")


def parse_line(raw):
    """One line's bytes -> its object, or None for a blank line; a PionError says what the line is instead."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PionError("is not UTF-8 text")
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # also a number of more digits than Python converts
        raise PionError("is not valid JSON")
    if not isinstance(value, dict):
        raise PionError("is not a JSON object")
    if SURROGATE_ESCAPE.search(line) and not is_unicode(json.dumps(value, ensure_ascii=False)):
        raise PionError("holds a lone surrogate (an escape such as \\ud800 that is no Unicode character)")
    return value
