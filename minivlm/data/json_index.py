"""Byte-offset indexes of JSON arrays and JSONL files: where each record is, not what it says.

A data file is indexed once at start-up and each record is parsed only when it is read, so a
558k-record LLaVA-Pretrain file costs a few seconds and a few tens of MB of offsets instead of
holding 558k parsed dicts (the previous ``json.load`` + validate-everything took 131 s and 2 GB;
``benchmarks/data_index.py`` measures both).

**JSON array** (:func:`index_json_array`): the bytes are scanned with numpy in chunks: unescaped
quotes delimit strings; outside strings, ``[``/``{`` and ``]``/``}`` change the nesting depth and
commas at depth 1 separate the records. The scan checks exactly what record boundaries depend
on (a top-level array, terminated strings, brackets that balance and match, one value between
separators, nothing after the array) and raises :class:`DataError` naming the line otherwise:
past such an error the records could not be trusted to line up. Any other syntax error is
inside one record (its brackets and strings balance) and is found when that record is parsed.

**JSONL** (:func:`index_jsonl`): one record per non-blank line.

Both return a :class:`RecordIndex`: ``[n]`` arrays of start and end byte offsets and of the
1-based line each record starts on (for messages such as ``data.json:1234: ...``). The file is
read in chunks and records later with ``pread``, never mapped whole: the index of a 180 MB file
adds ~100 MB to the process, not the file's size (``benchmarks/data_index.py``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from minivlm.data.sample import DataError

_CHUNK = 1 << 22  # bytes scanned per numpy pass: bounds the temporaries (a table lookup makes 8 bytes per byte)
_QUOTE, _BACKSLASH, _NEWLINE, _COMMA = ord('"'), ord("\\"), ord("\n"), ord(",")
_OPENERS, _CLOSERS = (ord("["), ord("{")), (ord("]"), ord("}"))
_DEPTH_CHANGE = np.zeros(256, dtype=np.int8)
_DEPTH_CHANGE[list(_OPENERS)], _DEPTH_CHANGE[list(_CLOSERS)] = 1, -1
_STRUCTURAL = np.zeros(256, dtype=bool)
_STRUCTURAL[[*_OPENERS, *_CLOSERS, _COMMA]] = True
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True


@dataclass
class RecordIndex:
    """Where each record of a file lies: ``starts``/``ends`` ``[n]`` int64 byte offsets (a record
    is ``data[starts[i]:ends[i]]``) and ``lines`` ``[n]`` the 1-based line it starts on."""

    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def select(self, keep: np.ndarray) -> RecordIndex:
        """The records at positions ``keep`` (bool mask or indices)."""
        return RecordIndex(self.starts[keep], self.ends[keep], self.lines[keep])


def read_record(fd: int, index: RecordIndex, position: int) -> bytes:
    """The raw bytes of record ``position`` of the file open as ``fd`` (no shared file offset,
    so DataLoader workers and threads may read at once)."""
    start, end = int(index.starts[position]), int(index.ends[position])
    return os.pread(fd, end - start, start)


def index_jsonl(path: str | os.PathLike) -> RecordIndex:
    """One record per line that is not blank (whitespace only)."""
    with open(path, "rb") as file:
        newlines = np.concatenate([np.flatnonzero(chunk == _NEWLINE) + offset for offset, chunk in _chunks(file)]
                                  or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
        size = file.seek(0, io.SEEK_END)
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.append(newlines, size).astype(np.int64)
        lines = np.arange(1, len(starts) + 1, dtype=np.int64)
        keep = ends > starts
        # A line is blank when every byte is whitespace; only lines that start with one need a look.
        first = np.zeros(len(starts), dtype=bool)
        first[keep] = _WHITESPACE[_bytes_at(file, starts[keep])]
        for i in np.flatnonzero(first):
            keep[i] = bool(os.pread(file.fileno(), int(ends[i] - starts[i]), int(starts[i])).strip())
    return RecordIndex(starts[keep], ends[keep], lines[keep])


def index_json_array(path: str | os.PathLike, name: str | None = None) -> RecordIndex:
    """The elements of the JSON array in ``path`` (see the module docstring).

    Raises:
        DataError: ``bad_json`` naming the line and column where the document's structure breaks.
    """
    with open(path, "rb") as file:
        return index_json_array_file(file, str(name or path))


def index_json_array_file(file: io.BufferedIOBase, name: str) -> RecordIndex:
    """:func:`index_json_array` of an open binary file (seekable)."""

    def fail(message: str, at: int) -> DataError:
        line, column = _line_and_column(file, at)
        return DataError(f"malformed JSON document: {message} (column {column})", reason="bad_json",
                         source=f"{name}:{line}")

    parity, depth, trailing_backslashes, last_quote = 0, 0, 0, -1
    open_kinds = np.zeros(0, dtype=np.uint8)  # the brackets still open, outermost first
    array_start, array_end = -1, -1  # the top-level array's brackets
    separators, value_openers = [], []  # per chunk: commas at depth 1, openers at depth 2
    for offset, chunk in _chunks(file):
        quotes = np.flatnonzero(chunk == _QUOTE)
        quotes = _drop_escaped(chunk, quotes, trailing_backslashes)
        if len(quotes):
            last_quote = offset + int(quotes[-1])
        symbols = np.flatnonzero(_STRUCTURAL[chunk])
        symbols = symbols[(np.searchsorted(quotes, symbols) + parity) % 2 == 0]  # odd: inside a string
        codes = chunk[symbols]
        depths = depth + np.cumsum(_DEPTH_CHANGE[codes], dtype=np.int64)  # depth after each symbol
        if len(depths) and depths.min() < 0:
            raise fail("a closing bracket without an opening one", offset + int(symbols[np.argmax(depths < 0)]))
        is_bracket = codes != _COMMA
        opens = _DEPTH_CHANGE[codes] > 0
        if array_start < 0 and len(symbols):
            array_start = offset + int(symbols[0]) if codes[0] == ord("[") else -2
        if array_end < 0 and (depths == 0).any():
            array_end = offset + int(symbols[np.argmax(depths == 0)])
        open_kinds = _match_brackets(open_kinds, symbols[is_bracket] + offset, codes[is_bracket],
                                     depths[is_bracket], fail)
        separators.append(symbols[~is_bracket & (depths == 1)] + offset)
        value_openers.append(symbols[opens & (depths == 2)] + offset)
        parity = (parity + len(quotes)) % 2
        depth = int(depths[-1]) if len(depths) else depth
        trailing_backslashes = _trailing_run(chunk, _BACKSLASH, trailing_backslashes)
    if parity:
        raise fail("a string is not terminated", last_quote)
    separators, openers = (np.concatenate(parts) for parts in (separators or [np.zeros(0, np.int64)],
                                                               value_openers or [np.zeros(0, np.int64)]))
    first = _first_non_whitespace(file, 0)
    if first is None or array_start != first:
        raise fail("expected a JSON array of records ('[')", first if first is not None else 0)
    if array_end < 0:
        raise fail("the array is not closed (unbalanced brackets)", file.seek(0, io.SEEK_END))
    trailing = _first_non_whitespace(file, array_end + 1)
    if trailing is not None:
        raise fail("unexpected data after the array", trailing)
    bounds = np.concatenate([[array_start], separators, [array_end]])
    starts, ends = bounds[:-1] + 1, bounds[1:]
    # Where each value begins (for its line): its first opener at depth 2, else (scalars) a look.
    openers = np.append(openers, np.iinfo(np.int64).max)  # + a sentinel
    value_at = openers[np.searchsorted(openers, starts)]
    value_at = np.where(value_at < ends, value_at, -1)
    for i in np.flatnonzero(value_at < 0):
        begin = _first_non_whitespace(file, int(starts[i]), int(ends[i]))
        if begin is None:
            if len(starts) == 1:  # "[]" or "[ ]": no records
                return RecordIndex(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
            raise fail("expected a value between separators", int(ends[i]))
        value_at[i] = begin
    return RecordIndex(starts.astype(np.int64), ends.astype(np.int64), _line_numbers(file, value_at))


# ---- scanning helpers ------------------------------------------------------------------------
def _chunks(file: io.BufferedIOBase) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, uint8 view)`` of consecutive chunks of the file from its start (one buffer)."""
    buffer = bytearray(_CHUNK)
    file.seek(0)
    offset = 0
    while True:
        n = file.readinto(buffer)
        if not n:
            return
        yield offset, np.frombuffer(buffer, dtype=np.uint8, count=n)
        offset += n


def _drop_escaped(chunk: np.ndarray, quotes: np.ndarray, carried_backslashes: int) -> np.ndarray:
    """``quotes`` without those escaped by an odd run of backslashes before them (the run may
    begin in the previous chunk: ``carried_backslashes`` ended it)."""
    after_backslash = quotes[((quotes > 0) & (chunk[np.maximum(quotes - 1, 0)] == _BACKSLASH))
                             | ((quotes == 0) & (carried_backslashes > 0))]
    escaped = []
    for q in after_backslash.tolist():  # rare: a quote inside text, written \"
        run = 0
        while q - run - 1 >= 0 and chunk[q - run - 1] == _BACKSLASH:
            run += 1
        if run == q:
            run += carried_backslashes
        if run % 2:
            escaped.append(q)
    return np.setdiff1d(quotes, np.asarray(escaped, dtype=np.int64), assume_unique=True) if escaped else quotes


def _trailing_run(chunk: np.ndarray, byte: int, carried: int) -> int:
    """How many ``byte`` end the chunk (continuing ``carried`` when the whole chunk is that byte)."""
    other = np.flatnonzero(chunk != byte)
    return len(chunk) - 1 - int(other[-1]) if len(other) else carried + len(chunk)


def _match_brackets(open_kinds: np.ndarray, positions: np.ndarray, kinds: np.ndarray, depths: np.ndarray,
                    fail) -> np.ndarray:
    """Check that every closer of a chunk closes an opener of its own kind; returns the kinds of
    the brackets still open after it (outermost first).

    With the brackets open before the chunk put first (at depths ``1..len(open_kinds)``), the
    depth never goes below 0, so at each depth openers and closers alternate: a stable sort by
    the depth each one opens puts every opener right before its closer, and each depth's odd one
    out is the opener that stays open.
    """
    n_open = len(open_kinds)
    kinds = np.concatenate([open_kinds, kinds])
    positions = np.concatenate([np.full(n_open, -1, dtype=np.int64), positions])
    depths = np.concatenate([np.arange(1, n_open + 1), depths])
    opener = _DEPTH_CHANGE[kinds] > 0
    level = np.where(opener, depths, depths + 1)
    order = np.argsort(level, kind="stable")
    kinds, positions, level = kinds[order], positions[order], level[order]
    group_end = np.flatnonzero(np.diff(level, append=np.iinfo(np.int64).max) != 0)  # last of each depth
    group_size = np.diff(group_end, prepend=-1)
    still_open = group_end[group_size % 2 == 1]
    closed = np.ones(len(kinds), dtype=bool)
    closed[still_open] = False
    pairs_kinds, pairs_positions = kinds[closed], positions[closed]
    closing_kind = np.where(pairs_kinds[0::2] == ord("["), ord("]"), ord("}"))
    wrong = np.flatnonzero(pairs_kinds[1::2] != closing_kind)
    if len(wrong):
        first = wrong[np.argmin(pairs_positions[1::2][wrong])]
        raise fail(f"'{chr(int(pairs_kinds[1::2][first]))}' closes a bracket of the other kind",
                   int(pairs_positions[1::2][first]))
    return kinds[still_open]


def _bytes_at(file: io.BufferedIOBase, positions: np.ndarray) -> np.ndarray:
    """The byte at each (sorted) position, read chunk by chunk."""
    found = np.zeros(len(positions), dtype=np.uint8)
    for offset, chunk in _chunks(file):
        lo, hi = np.searchsorted(positions, [offset, offset + len(chunk)])
        found[lo:hi] = chunk[positions[lo:hi] - offset]
    return found


def _first_non_whitespace(file: io.BufferedIOBase, begin: int, end: int | None = None) -> int | None:
    file.seek(begin)
    position = begin
    while end is None or position < end:
        block = file.read(1 << 16 if end is None else min(1 << 16, end - position))
        if not block:
            return None
        found = np.flatnonzero(~_WHITESPACE[np.frombuffer(block, dtype=np.uint8)])
        if len(found):
            return position + int(found[0])
        position += len(block)
    return None


def _line_numbers(file: io.BufferedIOBase, positions: np.ndarray) -> np.ndarray:
    """1-based line of each (sorted) position, counting newlines chunk by chunk."""
    lines = np.empty(len(positions), dtype=np.int64)
    seen = 0
    for offset, chunk in _chunks(file):
        newlines = np.flatnonzero(chunk == _NEWLINE) + offset
        lo, hi = np.searchsorted(positions, [offset, offset + len(chunk)])
        lines[lo:hi] = seen + np.searchsorted(newlines, positions[lo:hi]) + 1
        seen += len(newlines)
    return lines


def _line_and_column(file: io.BufferedIOBase, at: int) -> tuple[int, int]:
    file.seek(0)
    prefix = file.read(max(at, 0))
    return prefix.count(b"\n") + 1, at - (prefix.rfind(b"\n") + 1) + 1
