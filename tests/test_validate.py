import pandas as pd
import pytest

from pipeline.stages.validated_records import Bounds, validate_records


def frame(rows):
    df = pd.DataFrame(rows, columns=["instruction", "input", "output"])
    df.insert(0, "source_file", "f.json")
    df.insert(1, "source_line", range(1, len(df) + 1))
    df.insert(2, "source_index", range(len(df)))
    return df.astype({"instruction": "str", "input": "str", "output": "str"})


@pytest.fixture(scope="module")
def result():
    rows = [
        ("问", "", "答"),  # 1 ok
        ("问", "症状", None),  # 2 missing output
        ("\u3000 \t", "", "答"),  # 3 blank instruction (full-width space)
        ("问", "", "\u200b \n"),  # 4 blank output (zero-width space)
        ("问\x00", "", "答"),  # 5 NUL
        ("问", "a\x1bb", "答"),  # 6 escape char in input
        ("问", "", "答\x85"),  # 7 C1 control
        ("问", "", "bad \ufffd"),  # 8 replacement char (a lone surrogate after ingest)
        ("问", "", "x" * 50),  # 9 too long for the bounds below
        ("问", "tab\tand\nnewline", "答"),  # 10 ok: tab and newline are allowed
        ("问", "", "\ufffe"),  # 11 noncharacter
    ]
    return validate_records(frame(rows), Bounds(max_output_chars=40))


def test_valid_rows_are_kept(result):
    assert result.kept["source_line"].tolist() == [1, 10]


def test_each_failing_row_names_the_expectation(result):
    reasons = dict(zip(result.rejected["source_line"], result.rejected["reason"]))
    assert reasons[2] == "output: not missing (null) [expect_column_values_to_not_be_null]"
    assert reasons[3] == "instruction: not blank after trimming [expect_column_values_to_match_regex]"
    assert reasons[4].startswith("output: not blank after trimming")
    assert "instruction: no control characters other than newline and tab" in reasons[5]
    assert "input: no control characters" in reasons[6]
    assert "output: no control characters" in reasons[7]
    assert "output: valid Unicode" in reasons[8]
    assert reasons[9] == "output: length between 1 and 40 characters [expect_column_value_lengths_to_be_between]"
    assert "output: valid Unicode" in reasons[11]
    assert set(result.rejected["stage"]) == {"validate"}
    assert result.n_kept + result.n_rejected == 11


def test_report_lists_every_expectation_with_counts(result):
    md = result.stats["report_markdown"]
    for name in (
        "expect_column_to_exist",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_match_regex",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_not_match_regex",
    ):
        assert name in md
    nulls = [
        e
        for e in result.stats["expectations"]
        if e["expectation"] == "expect_column_values_to_not_be_null" and e["column"] == "output"
    ]
    assert nulls[0]["unexpected_count"] == 1 and nulls[0]["success"] is False


def test_missing_column_is_a_clear_error():
    df = frame([("a", "b", "c")]).drop(columns=["output"])
    with pytest.raises((ValueError, RuntimeError), match="output"):
        validate_records(df)


def test_rejected_raw_is_the_row_as_json(result):
    raw = result.rejected.loc[result.rejected["source_line"] == 9, "raw"].item()
    assert raw.startswith('{"instruction": "问", "input": "", "output": "xxx')
