"""Property-based tests: arbitrary Unicode never crashes parsing, normalisation or dedup, and
dedup is idempotent and keeps the same set of records whatever the row order."""

import json

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.stages.deduplicated_records import deduplicate, normalize_array, normalize_text
from pipeline.stages.raw_records import FileRejected, ingest_file, parse_text

# Code points Python's Unicode database (14.0 on Python 3.11) assigns: pyarrow's utf8proc knows a
# newer Unicode, so for a character assigned since (e.g. U+1CCD6, NFKC "A" in Unicode 16) the two
# normalisations rightly differ; the reference (Python) cannot speak for those.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")), max_size=40)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.text(max_size=200))
def test_parse_text_never_crashes(text):
    try:
        parsed = parse_text(text)
    except FileRejected:
        return
    assert len(parsed.values) == len(parsed.lines) == len(parsed.indexes)


@FAST
@given(st.binary(max_size=300))
def test_ingest_file_never_raises_and_accounts_for_rows(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "x.json"
    path.write_bytes(data)
    result = ingest_file(path, "x.json")
    kept = 0 if result.table is None else result.table.num_rows
    assert result.summary.rows_read == kept + len(result.rejected)


@FAST
@given(st.lists(st.fixed_dictionaries({"instruction": texts, "input": texts, "output": texts}), max_size=8))
def test_any_records_round_trip_through_ingest(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("r") / "x.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    result = ingest_file(path, "x.jsonl")
    if not records:
        assert result.summary.error == "file holds only whitespace"
        return
    assert result.summary.rows_read == len(records)  # JSON Lines of objects: one row each
    kept = result.table.to_pylist() if result.table is not None else []
    expected = [r for r in records]
    assert len(kept) + len(result.rejected) == len(expected)


@FAST
@given(st.lists(texts, min_size=1, max_size=20))
def test_vectorised_normalisation_matches_the_reference_and_is_idempotent(values):
    got = normalize_array(pd.Series(values, dtype="str")).to_pylist()
    assert got == [normalize_text(v) for v in values]
    assert normalize_array(pd.Series(got, dtype="str")).to_pylist() == got


def frame(rows):
    df = pd.DataFrame(rows, columns=["instruction", "input", "output"]).astype("str")
    df.insert(0, "source_file", "f")
    df.insert(1, "source_line", range(1, len(df) + 1))
    df.insert(2, "source_index", range(len(df)))
    return df


small = st.sampled_from(["问", " 问", "问 ", "Ｑ", "Q", "a  b", "a b", "答", "答案", ""])


@FAST
@given(st.lists(st.tuples(small, small, small), min_size=1, max_size=12), st.randoms())
def test_dedup_is_idempotent_and_order_independent(rows, rnd):
    once = deduplicate(frame(rows), "keep_all")
    twice = deduplicate(once.kept.drop(columns=["record_id", "prompt_id"]), "keep_all")
    assert twice.rejected.empty
    assert sorted(twice.kept["record_id"]) == sorted(once.kept["record_id"])
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    other = deduplicate(frame(shuffled), "keep_all")
    assert sorted(other.kept["record_id"]) == sorted(once.kept["record_id"])
    assert len(once.kept) + len(once.rejected) == len(rows)


JSONISH = st.lists(
    st.sampled_from(
        [
            "[",
            "]",
            "{",
            "}",
            ",",
            ":",
            '"instruction"',
            '"input"',
            '"output"',
            '"data"',
            '"答案"',
            '"\\ud800"',
            '"x"',
            "\n",
            "\r",
            " ",
            "NaN",
            "-Infinity",
            "1",
            "true",
            "null",
            '"',
            "\\",
            "\x00",
            "\ufeff",
        ]
    ),
    max_size=60,
).map("".join)


@FAST
@given(JSONISH)
def test_json_shaped_garbage_never_crashes_and_every_row_is_accounted(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("j") / "x.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = ingest_file(path, "x.json")
    kept = 0 if result.table is None else result.table.num_rows
    assert result.summary.rows_read == kept + len(result.rejected) >= 1


any_text = st.text(alphabet=st.characters(codec=None), max_size=30)  # lone surrogates and controls included


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.fixed_dictionaries({"instruction": any_text, "input": any_text, "output": any_text}), min_size=1, max_size=6
    )
)
def test_validation_and_dedup_take_any_unicode_and_account_for_every_row(tmp_path_factory, records):
    from pipeline.stages.validated_records import validate_records

    path = tmp_path_factory.mktemp("u") / "x.json"
    path.write_text(json.dumps(records), encoding="utf-8")  # \\ud800 escapes: valid JSON, invalid Unicode
    result = ingest_file(path, "x.json")
    kept = pd.DataFrame(result.table.to_pylist()) if result.table is not None else None
    assert result.summary.rows_read == len(records)
    if kept is None or kept.empty:
        return
    valid = validate_records(kept.astype({c: "str" for c in ("instruction", "input", "output")}))
    assert len(valid.kept) + len(valid.rejected) == len(kept)
    bad = {*range(0xD800, 0xE000), *range(0x00, 0x09), *range(0x0B, 0x20), 0x7F}
    for col in ("instruction", "input", "output"):  # nothing invalid got through
        assert not any(ord(ch) in bad for value in valid.kept[col] for ch in value)
    dedup = deduplicate(valid.kept, "keep_first")
    assert len(dedup.kept) + len(dedup.rejected) == len(valid.kept)


fragments = st.sampled_from(
    [
        '{"instruction": "问", "input": "", "output": "答"}',
        '{"instruction":"长 文本","input":"x","output":"答案"}',
        '{"instruction": "a", "instruction": "b", "output": "c"}',
        '{"instruction": "a", "output": "c"',
        '{"output": 1}',
        "[",
        "]",
        ",",
        "\n",
        "\r\n",
        " ",
        '"text"',
        "{",
        "}",
        '{"Instruction ": "k", "output": "v", "extra": 1}',
        '{"instruction": "a\\"q", "output": "\\u4e2d"}',
        "NaN",
        "// note",
        "\r",
        '[{"instruction": "n", "output": "m"}]',
        '{"instruction": "' + "很长的问题" * 30 + '", "output": "' + "答" * 80 + '"}',
        "\ufeff",
    ]
)


@FAST
@given(
    st.lists(fragments, min_size=1, max_size=30),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=4),
    st.booleans(),
)
def test_a_file_read_in_blocks_gives_what_reading_it_whole_gives(tmp_path_factory, parts, block_bytes, piece_rows, bom):
    """Any JSON-ish text, JSON Lines or array, read through the block window (``stream_over=0``,
    blocks of 1-64 bytes): the same rows, rejected rows (reasons with their line and column) and
    summary as reading the file whole."""
    import pyarrow as pa

    from pipeline.stages.raw_records.blocks import iter_file

    path = tmp_path_factory.mktemp("b") / "x.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(parts).encode("utf-8"))
    whole = ingest_file(path, "x.json")
    pieces = list(iter_file(path, "x.json", stream_over=0, block_bytes=block_bytes, piece_rows=piece_rows))
    tables = [p.table for p in pieces if p.table is not None]
    got = pa.concat_tables(tables).to_pylist() if tables else []
    assert got == (whole.table.to_pylist() if whole.table is not None else [])
    assert [r for p in pieces for r in p.rejected] == whole.rejected
    assert pieces[-1].summary == whole.summary
