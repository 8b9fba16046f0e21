"""jsonl.py: the strict reader of JSON Lines files."""
import pytest

from cli import PionError
from jsonl import jsonl_objects


def write(tmp_path, data):
    (tmp_path / "f.jsonl").write_bytes(data)
    return str(tmp_path / "f.jsonl")


def test_each_object_comes_with_its_line_number_and_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n\n  \n{"b": "\xc3\xa9"}\n')
    assert list(jsonl_objects(path)) == [(1, {"a": 1}), (4, {"b": "\u00e9"})]


def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_line(tmp_path):
    assert list(jsonl_objects(write(tmp_path, b'\xef\xbb\xbf{"a": 1}\n'))) == [(1, {"a": 1})]


@pytest.mark.parametrize("line, problem", [(b"{\"a\": \"\xff\"}", "is not UTF-8 text"),
                                           (b"{not json", "is not valid JSON"),
                                           (b'{"a": 1%s}' % (b"0" * 5000), "is not valid JSON"),
                                           (b"[1, 2]", "is not a JSON object"),
                                           (b'{"a": "\\ud800"}', "holds a lone surrogate")])
def test_a_bad_line_is_named_by_its_number(tmp_path, line, problem):
    path = write(tmp_path, b'{"a": "\\ud83d\\ude00"}\n' + line + b"\n{}\n")
    with pytest.raises(PionError, match=f"^{path}:2 {problem}"):
        list(jsonl_objects(path))


def test_a_torn_last_line_is_left_out_only_when_asked(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n{"a": 2, "b')
    assert list(jsonl_objects(path, torn_end_ok=True)) == [(1, {"a": 1})]
    with pytest.raises(PionError, match=":2 is not valid JSON"):
        list(jsonl_objects(path))


def test_a_bad_line_that_ends_with_its_newline_is_not_torn(tmp_path):
    with pytest.raises(PionError, match=":2 is not valid JSON"):
        list(jsonl_objects(write(tmp_path, b'{"a": 1}\n{"a": 2, "b\n'), torn_end_ok=True))
