"""Byte-offset indexes of JSON arrays and JSONL: each record's bytes and start line, and every
structural break of a document found with its line."""

from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.data.json_index import index_json_array, index_json_array_file, index_jsonl, read_record
from minivlm.data.sample import DataError


def parsed(text: str) -> list[tuple[int, object]]:
    data = text.encode()
    index = index_json_array_file(io.BytesIO(data), "f.json")
    return [(int(line), json.loads(data[a:b])) for a, b, line in zip(index.starts, index.ends, index.lines)]


json_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=5,
)


@settings(max_examples=30, deadline=None)
@given(
    elements=st.lists(json_values, max_size=6),
    indents=st.lists(st.sampled_from([None, 0, 2]), min_size=6, max_size=6),
    blank_lines=st.lists(st.integers(0, 2), min_size=7, max_size=7),
)
def test_json_array_index_finds_each_element_with_its_start_line(elements, indents, blank_lines):
    text, expected_lines = "[", []
    for i, element in enumerate(elements):
        text += "\n" * blank_lines[i] + " "
        expected_lines.append(text.count("\n") + 1)
        text += json.dumps(element, indent=indents[i]) + ("," if i < len(elements) - 1 else "")
    text += "\n" * blank_lines[-1] + "]\n"
    found = parsed(text)
    assert [value for _, value in found] == elements
    assert [line for line, _ in found] == expected_lines


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[\n  {"id": 1},\n  {"id": 2\n]', 4, "']' closes a bracket of the other kind"),
        ('[\n  {"id": 1},\n  {"id": [2]\n', 4, "not closed"),  # at the end of the file
        ('{"id": 1}', 1, "expected a JSON array"),
        ('[\n{"id": 1}\n]\n]', 4, "closing bracket without an opening one"),
        ("[\n  1,\n  2,,\n]", 3, "expected a value"),
        ('[\n  {"a": [1}]\n]', 2, "'}' closes a bracket of the other kind"),
        ('[\n  "abc\n]', 2, "not terminated"),
        ("[1, 2]\nx", 2, "after the array"),
        ("[1,]", 1, "expected a value"),
        ("", 1, "expected a JSON array"),
    ],
)
def test_a_structural_break_raises_naming_its_line(text, line, message):
    with pytest.raises(DataError, match=rf"^f\.json:{line}: malformed JSON document: .*{message}") as raised:
        parsed(text)
    assert raised.value.reason == "bad_json"


def test_quotes_and_brackets_inside_strings_are_text():
    values = [{"a": 'x]"},{'}, {"], b": "\\"}, '[{\\"', "\\\\", 3]
    text = json.dumps(values)
    assert '\\"' in text and '\\\\"' in text  # escaped quotes, and escaped backslashes before a quote
    assert [value for _, value in parsed(text)] == values


def test_records_are_read_by_offset(tmp_path, monkeypatch):
    values = [{"a": i, "t": "x" * i} for i in range(5)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(values, indent=1))
    monkeypatch.setattr("minivlm.data.json_index._CHUNK", 16)  # records and strings straddle chunks
    index = index_json_array(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert [json.loads(read_record(fd, index, i)) for i in range(len(index))] == values
    finally:
        os.close(fd)


def test_escapes_straddling_chunks(monkeypatch):
    monkeypatch.setattr("minivlm.data.json_index._CHUNK", 3)
    values = ['a\\"b', "\\\\", {"k": '\\\\\\"'}, '"', ""]
    assert [value for _, value in parsed(json.dumps(values))] == values


def test_an_empty_array_has_no_records(tmp_path):
    for text in ("[]", " [ \n ] \n"):
        (tmp_path / "e.json").write_text(text)
        assert len(index_json_array(tmp_path / "e.json")) == 0


def test_jsonl_index_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n \t{"b": 2}\r\n{oops\n\n')
    index = index_jsonl(path)
    data = path.read_bytes()
    assert index.lines.tolist() == [1, 4, 5]
    assert [data[a:b] for a, b in zip(index.starts, index.ends)] == [b'{"a": 1}', b' \t{"b": 2}\r', b"{oops"]
