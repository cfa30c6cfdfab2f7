import json
import os

import pytest

from conftest import INSTR, rec, write_json, write_jsonl
from pipeline.stages.raw_records import FileRejected, decode_lines, ingest, parse_text


def test_reads_arrays_and_json_lines_recursively_in_sorted_order(raw_dir):
    write_json(raw_dir / "b.json", [rec("b1", "B1"), rec("b2", "B2")])
    write_jsonl(raw_dir / "a" / "z.jsonl", [rec("a1", "A1"), rec("a2", "A2")])
    (raw_dir / "notes.txt").write_text("ignored")
    r = ingest(raw_dir)
    assert r.kept["source_file"].tolist() == ["a/z.jsonl", "a/z.jsonl", "b.json", "b.json"]
    assert r.kept["input"].tolist() == ["a1", "a2", "b1", "b2"]
    assert r.kept["source_line"].tolist() == [1, 2, 2, 7]  # JSONL line; line where the array element starts
    assert r.kept["source_index"].tolist() == [0, 1, 0, 1]
    assert r.stats["files_ignored"] == ["notes.txt"]
    assert r.rejected.empty


@pytest.mark.parametrize(
    "encoding,prefix,label",
    [
        ("utf-8", b"", "utf-8"),
        ("utf-8", b"\xef\xbb\xbf", "utf-8-sig"),
        ("utf-16-le", b"\xff\xfe", "utf-16-le"),
        ("utf-16-be", b"\xfe\xff", "utf-16-be"),
        ("gb18030", b"", "gb18030"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_encodings(raw_dir, encoding, prefix, label, fmt):
    rows = [rec("咳嗽，咽喉肿痛", "板蓝根颗粒可能适合治疗您的病症。"), rec("失眠多梦", "归脾丸")]
    if fmt == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=2)
    else:
        text = "\n".join(json.dumps(x, ensure_ascii=False) for x in rows) + "\n"
    (raw_dir / f"x.{fmt}").write_bytes(prefix + text.encode(encoding))
    r = ingest(raw_dir)
    assert r.rejected.empty, r.rejected["reason"].tolist()
    assert r.kept["output"].tolist() == ["板蓝根颗粒可能适合治疗您的病症。", "归脾丸"]
    assert r.stats["files"][0]["encoding"] == label


def test_mixed_utf8_and_gb18030_lines_keep_both(raw_dir):
    a = json.dumps(rec("头痛", "川芎茶调散"), ensure_ascii=False).encode("utf-8")
    b = json.dumps(rec("咳嗽", "急支糖浆"), ensure_ascii=False).encode("gb18030")
    (raw_dir / "mixed.jsonl").write_bytes(a + b"\n" + b + b"\n")
    r = ingest(raw_dir)
    assert r.kept["output"].tolist() == ["川芎茶调散", "急支糖浆"]
    assert r.stats["files"][0]["encoding"] == "mixed utf-8 + gb18030"


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "empty file"),
        (b"  \n\t \n", "only whitespace"),
        (b" [ ]\n", "the JSON array holds no records"),
        (bytes(range(128, 256)) * 4, "not valid UTF-8"),
        (b"\xff\xfe\x00\x00[]", "UTF-32"),
        (b"\xef\xbb\xbf\xff\xfe", "declares utf-8-sig"),
        ("[1]".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
        (b"hello world", "not JSON"),
        (b'{"name": "dump", "rows": 2}', "top-level JSON object"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "binary data"),
    ],
)
def test_unusable_files_are_rejected_whole_with_a_reason(raw_dir, content, needle):
    (raw_dir / "bad.json").write_bytes(content)
    write_json(raw_dir / "good.json", [rec("x", "y")])
    r = ingest(raw_dir)
    assert r.kept["source_file"].tolist() == ["good.json"]
    assert len(r.rejected) == 1
    row = r.rejected.iloc[0]
    assert row["source_file"] == "bad.json" and row["stage"] == "ingest"
    assert needle in row["reason"], row["reason"]
    assert row["reason"].startswith("file rejected:")


def test_non_string_values_reject_the_row_not_the_file(raw_dir):
    write_jsonl(
        raw_dir / "x.jsonl",
        [
            rec("ok", "fine"),
            {"instruction": INSTR, "input": 42, "output": "x"},
            {"instruction": INSTR, "input": "a", "output": ["list"]},
            {"instruction": {"o": 1}, "input": "a", "output": "x"},
            {"instruction": INSTR, "input": "a", "output": None},
            {"instruction": INSTR, "input": "a", "output": True},
            '{"instruction": "a", "output": NaN}',
            '["not", "an", "object"]',
            "this line is broken {",
            rec("ok2", "fine2"),
        ],
    )
    r = ingest(raw_dir)
    assert r.kept["input"].tolist() == ["ok", "ok2"]
    reasons = dict(zip(r.rejected["source_line"], r.rejected["reason"]))
    assert reasons[2] == "field 'input' is a number, expected a string"
    assert reasons[3] == "field 'output' is a list, expected a string"
    assert reasons[4] == "field 'instruction' is an object, expected a string"
    assert reasons[5] == "field 'output' is null"
    assert reasons[6] == "field 'output' is a boolean, expected a string"
    assert reasons[7] == "field 'output' is NaN, expected a string"
    assert reasons[8] == "record is a list, expected a JSON object"
    assert reasons[9].startswith("invalid JSON")
    assert set(r.rejected["stage"]) == {"ingest"}
    assert r.rejected.loc[r.rejected["source_line"] == 2, "raw"].item() == json.dumps(
        {"instruction": INSTR, "input": 42, "output": "x"}, ensure_ascii=False
    )


def test_missing_input_is_empty_and_missing_output_is_null(raw_dir):
    write_json(raw_dir / "x.json", [{"instruction": "q", "output": "a"}, {"instruction": "q2"}])
    r = ingest(raw_dir)
    assert r.kept["input"].tolist() == ["", ""]
    assert r.kept["output"].isna().tolist() == [False, True]  # validation rejects the missing output


def test_keys_in_other_case_or_with_spaces(raw_dir):
    write_json(raw_dir / "x.json", [{" Instruction": "q", "INPUT ": "i", "Output": "a", "extra": 1}])
    r = ingest(raw_dir)
    assert r.kept[["instruction", "input", "output"]].values.tolist() == [["q", "i", "a"]]


def test_windows_line_endings(raw_dir):
    text = json.dumps([rec("line1\r\nline2", "a\rb")], ensure_ascii=False, indent=2).replace("\n", "\r\n")
    (raw_dir / "x.json").write_bytes(text.encode())
    write_jsonl(raw_dir / "y.jsonl", [rec("p", "q")])
    (raw_dir / "y.jsonl").write_bytes((raw_dir / "y.jsonl").read_bytes().replace(b"\n", b"\r\n"))
    r = ingest(raw_dir)
    assert r.rejected.empty
    assert r.kept["input"].tolist() == ["line1\nline2", "p"]
    assert r.kept["output"].tolist() == ["a\nb", "q"]


def test_broken_array_element_costs_that_element_only(raw_dir):
    text = (
        "[\n"
        '  {"instruction": "q1", "output": "a1"},\n'
        '  {"instruction": "q2", "output": "a2",},\n'
        '  {"instruction": "q3", "output": "a3"},\n'
        '  {"instruction": "q4", "output": "a4"},\n'
        "]\n"
    )
    (raw_dir / "x.json").write_text(text)
    r = ingest(raw_dir)
    assert r.kept["instruction"].tolist() == ["q1", "q3", "q4"]
    assert r.kept["source_line"].tolist() == [2, 4, 5]
    assert r.kept["source_index"].tolist() == [0, 2, 3]
    assert r.rejected[["source_line", "source_index"]].values.tolist() == [[3, 1]]
    assert "invalid JSON" in r.rejected["reason"].item()
    assert '"q2"' in r.rejected["raw"].item()


def test_truncated_array_keeps_complete_elements(raw_dir):
    (raw_dir / "x.json").write_text('[{"instruction": "q1", "output": "a1"},\n {"instruction": "q2", "outp')
    r = ingest(raw_dir)
    assert r.kept["instruction"].tolist() == ["q1"]
    assert len(r.rejected) >= 1
    assert r.stats["rows_read"] == len(r.kept) + len(r.rejected)


def test_single_object_file_is_one_record(raw_dir):
    write_json(raw_dir / "one.json", rec("x", "y"))
    r = ingest(raw_dir)
    assert r.kept["output"].tolist() == ["y"]


def test_nested_arrays_are_rejected_rows(raw_dir):
    write_json(raw_dir / "x.json", [[rec("a", "b")], rec("c", "d")])
    r = ingest(raw_dir)
    assert r.kept["input"].tolist() == ["c"]
    assert r.rejected["reason"].tolist() == ["record is a list, expected a JSON object"]


def test_json_lines_blank_lines_are_skipped_and_counted(raw_dir):
    write_jsonl(raw_dir / "x.jsonl", [rec("a", "b"), "", "   ", rec("c", "d")])
    r = ingest(raw_dir)
    assert r.kept["source_line"].tolist() == [1, 4]
    assert r.stats["files"][0]["blank_lines"] == 2


def test_lone_surrogate_is_marked_for_validation(raw_dir):
    (raw_dir / "x.json").write_text('[{"instruction": "q", "output": "bad \\ud800 text"}]')
    r = ingest(raw_dir)
    assert r.kept["output"].tolist() == ["bad \ufffd text"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_outside_raw_folder_is_refused(raw_dir, tmp_path):
    outside = write_json(tmp_path / "secret.json", [rec("s", "t")])
    os.symlink(outside, raw_dir / "link.json")
    inside = write_json(raw_dir / "real.json", [rec("a", "b")])
    os.symlink(inside, raw_dir / "alias.json")
    r = ingest(raw_dir)
    assert r.kept["source_file"].tolist() == ["alias.json", "real.json"]
    assert r.rejected["source_file"].tolist() == ["link.json"]
    assert "outside the raw folder" in r.rejected["reason"].item()


def test_file_name_with_spaces_and_non_ascii(raw_dir):
    write_json(raw_dir / "新 数据 (1).json", [rec("a", "b")])
    r = ingest(raw_dir)
    assert r.kept["source_file"].tolist() == ["新 数据 (1).json"]


def test_missing_raw_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="raw data folder"):
        ingest(tmp_path / "nope")


def test_decode_lines_reports_undecodable_lines():
    data = b"[\n" + '{"a": "中文"}'.encode("gb18030") + b"\n\xff\xff\n]"
    text, enc, bad = decode_lines(data)
    assert enc == "gb18030" and list(bad) == [3]


def test_parse_text_sniffs_format():
    assert parse_text('[{"a": 1}]').format == "JSON array"
    assert parse_text('{"a": 1}\n{"a": 2}\n').format == "JSON Lines"
    with pytest.raises(FileRejected):
        parse_text("   ")


def test_every_row_is_accounted_for(raw_dir):
    write_json(raw_dir / "a.json", [rec("a", "b"), {"instruction": 1}, [1]])
    write_jsonl(raw_dir / "b.jsonl", [rec("c", "d"), "broken", ""])
    (raw_dir / "c.json").write_bytes(b"\x00\x01\x02garbage")
    r = ingest(raw_dir)
    assert r.stats["rows_read"] == len(r.kept) + len(r.rejected) == 2 + 4


def test_records_wrapped_in_a_top_level_object_are_read_with_their_lines(raw_dir):
    (raw_dir / "w.json").write_text(
        '{"meta": {"data": [1]},\n "data": [\n  {"instruction": "q1", "output": "a1"},\n  {"instruction": "q2", '
        '"output": "a2"}\n ]}'
    )
    (raw_dir / "k.json").write_text(
        '{"id1": {"instruction": "q3", "output": "a3"},\n "id2": {"instruction": "q4", "output": "a4"}}'
    )
    r = ingest(raw_dir)
    assert r.rejected.empty
    assert r.kept[["source_file", "instruction", "source_line"]].values.tolist() == [
        ["k.json", "q3", 1],
        ["k.json", "q4", 2],
        ["w.json", "q1", 3],
        ["w.json", "q2", 4],
    ]


def test_duplicate_keys_with_different_values_reject_the_row(raw_dir):
    (raw_dir / "a.json").write_text(
        '[{"instruction": "q", "output": "a", "output": "b"},\n {"instruction": "q2", "output": "x", "output": "x"}]'
    )
    (raw_dir / "b.jsonl").write_text(
        '{"instruction": "q3", "instruction": "q4", "output": "y"}\n{"instruction": "q5", "output": "z"}\n'
    )
    r = ingest(raw_dir)
    assert r.kept["instruction"].tolist() == ["q2", "q5"]
    assert r.rejected[["source_file", "source_line"]].values.tolist() == [["a.json", 1], ["b.jsonl", 1]]
    assert all("given twice in one record with different values" in x for x in r.rejected["reason"])


def test_a_truncated_last_element_is_one_rejected_row_not_two(raw_dir):
    (raw_dir / "t.json").write_text('[{"instruction": "q1", "output": "a1"},\n {"instruction": "q2", "outp')
    r = ingest(raw_dir)
    assert r.stats["rows_read"] == 2
    assert r.rejected["reason"].item().startswith("truncated JSON (the file ends inside this element)")


def test_old_mac_line_endings_split_lines(raw_dir):
    (raw_dir / "m.jsonl").write_bytes(b'{"instruction": "q1", "output": "a1"}\r{"instruction": "q2", "output": "a2"}\r')
    r = ingest(raw_dir)
    assert r.kept[["instruction", "source_line"]].values.tolist() == [["q1", 1], ["q2", 2]]
