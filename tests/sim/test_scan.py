"""The compiled Mooncake line reader (`kvstore.sim._scan`) against the json path it
speeds up: every line, well formed or not, must give the same request or the same error."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvstore.sim._scan import Interner, scan_mooncake

from kvstore.sim import traces
from kvstore.sim.traces import TraceFormat

MOONCAKE = TraceFormat.MOONCAKE
BT = 512


def by_json(path: Path) -> list[tuple[int | None, object]]:
    """What the text reader and json make of each line (the reference): (line number,
    request or error), the number None where the line is well formed (the compiled
    reader does not number those)."""
    out: list[tuple[int | None, object]] = []
    for number, line in traces._lines(path):
        try:
            out.append((None, traces._parse_line(MOONCAKE, json.loads(line), BT)))
        except (ValueError, KeyError, TypeError) as e:
            out.append((number, (type(e).__name__, str(e))))
    return out


def by_scanner(path: Path) -> list[tuple[int | None, object]]:
    """The same through the compiled reader (`traces._scanned`)."""
    interner = Interner()
    timestamps, lengths, counts, flat, left = traces._scanned(path, BT, interner)
    fixed = {index: (number, request) for index, number, request in left}
    out: list[tuple[int | None, object]] = []
    offset = 0
    for index, count in enumerate(counts):
        if index in fixed:
            number, request = fixed[index]
            if isinstance(request, Exception):
                out.append((number, (type(request).__name__, str(request))))
            elif request is not None:
                out.append((None, request))
            continue
        keys = interner.keys_of(flat, offset, offset + count)
        offset += count
        out.append((None, (timestamps[index], lengths[index], keys)))
    return out


spaces = st.sampled_from(["", " ", "  ", "\t", " \t "])
ints = st.one_of(st.integers(0, 300), st.integers(0, 2**70), st.integers(-5, -1))
literal_ints = st.one_of(ints.map(str), st.sampled_from(["01", "1.0", "1e3", "2E-1", "-0",
                                                         "true", "null", '"7"', "[]", "{}"]))


@st.composite
def member(draw: st.DrawFn, key: str) -> str:
    if key == "hash_ids":
        items = draw(st.lists(st.integers(0, 300).map(str), max_size=6))
        if draw(st.integers(0, 2)) == 0:  # one odd item somewhere
            items.insert(draw(st.integers(0, len(items))), draw(literal_ints))
        sep = draw(spaces) + "," + draw(spaces)
        value = "[" + draw(spaces) + sep.join(items) + draw(spaces) + "]"
        value = draw(st.sampled_from([value, value, value, "null", '"x"', "5"]))
    elif key == "input_length":
        value = draw(st.one_of(st.integers(1, 600).map(str), st.integers(-3, 4000).map(str),
                               literal_ints))
    elif key == "timestamp":
        value = draw(st.one_of(st.integers(0, 10**12).map(str),
                               st.floats(0, 1e9, allow_nan=False).map(repr),
                               st.sampled_from(["null", "1e3", "-5", '"12"', "true", "[1]"])))
    else:
        value = draw(st.sampled_from(['"text"', '"t\\u00e9"', '"a\\"b"', "3.5", "null",
                                      "[1, 2]", '{"a": 1}', "false", '"caf\u00e9"']))
    name = draw(st.sampled_from([f'"{key}"'] * 5 + ['"hash\\u005fids"']))
    return name + draw(spaces) + ":" + draw(spaces) + value


@st.composite
def line(draw: st.DrawFn) -> str:
    keys = draw(st.lists(st.sampled_from(["hash_ids", "input_length", "timestamp", "extra",
                                          "hash_ids"]), min_size=0, max_size=5))
    if draw(st.integers(0, 3)):  # mostly the three fields, in some order
        keys = draw(st.permutations(["hash_ids", "input_length", "timestamp"])) + keys[:1]
    members = [draw(member(k)) for k in keys]
    body = "{" + draw(spaces) + (draw(spaces) + "," + draw(spaces)).join(members) \
        + draw(spaces) + "}"
    return draw(st.sampled_from([body] * 8 + [body[:-1], body + ",", "[" + body + "]", "",
                                              "   ", "\x0c", "\ufeff" + body, body + " x"]))


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line(), min_size=1, max_size=8),
       ending=st.sampled_from(["\n", "\r\n", "\r"]), last_newline=st.booleans())
def test_the_scanner_reads_every_line_as_json_does(tmp_path: Path, lines: list[str],
                                                   ending: str, last_newline: bool) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes((ending.join(lines) + (ending if last_newline else "")).encode())
    assert by_scanner(path) == by_json(path)


def test_the_conversation_shape_takes_the_compiled_path(tmp_path: Path) -> None:
    rows = [{"timestamp": 27482, "input_length": 6955, "output_length": 52,
             "hash_ids": list(range(14))},
            {"timestamp": 30535, "input_length": 513, "hash_ids": [0, 15]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    interner = Interner()
    timestamps, lengths, counts, flat, left = scan_mooncake(path.read_bytes(), BT, interner)
    assert (timestamps, lengths, counts, left) == ([27.482, 30.535], [6955, 513], [14, 2], [])
    assert list(flat) == [*range(14), 0, 14]  # dense ids in order of first appearance
    assert interner.keys_of(flat, 14, 16) == [0, 15]
    assert by_scanner(path) == by_json(path)


ODD = ["01", "1.0", "1e3", "2E-1", "-0", "-3", "true", "false", "null", '"7"', "[]", "{}",
       "[1]", "123456789012345678", "1234567890123456789", str(2**64), "0", "1", "600",
       '"a\\"b"', "tru", "nul"]


def test_each_odd_value_in_each_field_reads_as_json_does(tmp_path: Path) -> None:
    lines = []
    for odd in ODD:
        lines += [f'{{"timestamp": 5, "input_length": 600, "hash_ids": [1, {odd}]}}',
                  f'{{"timestamp": 5, "input_length": {odd}, "hash_ids": [1, 2]}}',
                  f'{{"timestamp": {odd}, "input_length": 6, "hash_ids": [1]}}',
                  f'{{"timestamp": 5, "input_length": 6, "hash_ids": {odd}}}',
                  f'{{"hash_ids": [2], "input_length": 6, "other": {odd}}}',
                  f'{{"hash_ids": [3], "input_length": 7, "hash_ids": [{odd}]}}']
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    scanned, reference = by_scanner(path), by_json(path)
    assert len(scanned) == len(lines)
    for got, want in zip(scanned, reference, strict=True):
        assert got == want, lines[got[0] - 1]
