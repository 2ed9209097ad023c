"""Loading every supported layout, validation messages, and splitting."""
from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from pydantic import ValidationError

from medqa.data.sources import load_records, load_source, load_test_labels, validate_records
from medqa.data.splits import balanced_cap, cap, split_records, split_stats
from medqa.errors import PipelineError
from medqa.params import SplitParams
from tests.conftest import make_original


def _hf_rows(original: dict) -> list[dict]:
    return [
        {"pubid": int(k), "question": v["QUESTION"], "long_answer": v["LONG_ANSWER"],
         "final_decision": v["final_decision"],
         "context": {"contexts": v["CONTEXTS"], "labels": v["LABELS"], "meshes": v["MESHES"]}}
        for k, v in original.items()
    ]


def test_original_hf_jsonl_parquet_and_directory_layouts_agree(tmp_path, official_dir):
    original = make_original(12)
    (tmp_path / "ori.json").write_text(json.dumps(original))
    rows = _hf_rows(original)
    (tmp_path / "hf.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "hf.parquet")
    loaded = [validate_records(load_records(str(tmp_path / name)))
              for name in ("ori.json", "hf.jsonl", "hf.parquet")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0] == {
        "pmid": "1000", "question": original["1000"]["QUESTION"], "contexts": original["1000"]["CONTEXTS"],
        "long_answer": original["1000"]["LONG_ANSWER"], "final_decision": "yes",
    }
    from_dir = validate_records(load_records(str(official_dir)))
    assert len(from_dir) == 40
    labels = load_test_labels(str(official_dir), None)
    assert len(labels) == 10 and set(labels) <= {r["pmid"] for r in from_dir}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("final_decision", "perhaps", "record 1003: field 'final_decision' is 'perhaps'"),
        ("QUESTION", "  ", "record 1003: field 'question' is missing or empty"),
        ("LONG_ANSWER", None, "record 1003: field 'long_answer' is missing or empty"),
        ("CONTEXTS", [], "record 1003: field 'contexts' is missing or empty"),
    ],
)
def test_bad_record_names_record_and_field(tmp_path, field, value, message):
    original = make_original(6)
    original["1003"][field] = value
    (tmp_path / "bad.json").write_text(json.dumps(original))
    with pytest.raises(PipelineError, match=message):
        validate_records(load_records(str(tmp_path / "bad.json")))


def test_a_record_without_a_field_is_named_not_taken_for_another_layout(tmp_path):
    original = make_original(6)
    del original["1003"]["QUESTION"]
    (tmp_path / "ori_pqal.json").write_text(json.dumps(original))
    with pytest.raises(PipelineError, match="record 1003: field 'question' is missing or empty"):
        validate_records(load_records(str(tmp_path / "ori_pqal.json")))


def test_a_jsonl_source_keeps_unicode_line_separators_inside_its_strings(tmp_path):
    # PubMedQA's abstracts hold U+2028; JSON written with ensure_ascii=False keeps it raw, and it
    # ends a line for str.splitlines but not for JSON Lines.
    rows = _hf_rows(make_original(3))
    rows[1]["long_answer"] = "First sentence.\u2028Second sentence."
    (tmp_path / "raw.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    loaded = validate_records(load_records(str(tmp_path / "raw.jsonl")))
    assert loaded[1]["long_answer"] == "First sentence.\u2028Second sentence."
    assert len(loaded) == 3


@pytest.mark.parametrize("name", ["ori_pqal.json", "records.jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path, name):
    text = json.dumps(make_original(2)) if name.endswith(".json") else "\n".join(
        json.dumps(r) for r in _hf_rows(make_original(2)))
    offset = text.index("treatment 1")
    data = text.encode()[:offset] + "traitement é".encode("latin-1") + text.encode()[offset + 12:]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(PipelineError, match=rf"{name} is not UTF-8 text: byte offset {offset + 11} "):
        load_records(str(tmp_path / name))


def test_duplicate_ids_and_unreadable_files_are_clear_errors(tmp_path):
    rows = _hf_rows(make_original(3))
    rows.append(dict(rows[1]))
    (tmp_path / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(PipelineError, match="record 1001: duplicate id"):
        validate_records(load_records(str(tmp_path / "dup.jsonl")))
    (tmp_path / "cut.json").write_text('{"1": {"QUESTION": "a"')
    with pytest.raises(PipelineError, match="cut.json is not valid JSON"):
        load_records(str(tmp_path / "cut.json"))
    with pytest.raises(PipelineError, match="does not exist"):
        load_records(str(tmp_path / "nowhere.json"))
    with pytest.raises(PipelineError, match="without ori_pqal.json"):
        load_records(str(tmp_path))
    # json.load keeps the last of two equal keys: a pmid given twice in ori_pqal.json must not vanish.
    text = json.dumps(make_original(3))
    (tmp_path / "twice.json").write_text(text[:-1] + ', "1001": ' + json.dumps(make_original(3)["1001"]) + "}")
    with pytest.raises(PipelineError, match="twice.json: duplicate key '1001'"):
        load_records(str(tmp_path / "twice.json"))


def test_decision_case_and_spacing_are_normalised(tmp_path):
    original = make_original(3)
    original["1000"]["final_decision"] = " Yes"
    original["1001"]["final_decision"] = "NO "
    (tmp_path / "ori_pqal.json").write_text(json.dumps(original))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"1000": "Yes "}))
    records = validate_records(load_records(str(tmp_path)))
    assert [r["final_decision"] for r in records] == ["yes", "no", "yes"]
    assert load_test_labels(str(tmp_path), None) == {"1000": "yes"}


def test_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ref = tmp_path / "hub.yaml"
    ref.write_text("dataset: qiaojin/PubMedQA-does-not-exist\nconfig: pqa_labeled\n")
    with pytest.raises(PipelineError, match="point data.source at a local copy"):
        load_records(str(ref))
    ref.write_text("dataset: qiaojin/PubMedQA\n")
    with pytest.raises(PipelineError, match="needs `dataset` and `config`"):
        load_records(str(ref))


def _records(n=60):
    return validate_records([
        {"pmid": k, "question": v["QUESTION"], "contexts": v["CONTEXTS"], "long_answer": v["LONG_ANSWER"],
         "final_decision": v["final_decision"]} for k, v in make_original(n).items()
    ])


def test_official_split_uses_the_test_pmids_and_is_disjoint():
    rows = _records()
    test_labels = {r["pmid"]: r["final_decision"] for r in rows[::4]}
    splits = split_records(rows, SplitParams("official", 0.1, 0.2, 1), test_labels)
    assert {r["pmid"] for r in splits["test"]} == set(test_labels)
    ids = [r["pmid"] for part in splits.values() for r in part]
    assert len(ids) == len(set(ids)) == len(rows)
    assert len(splits["val"]) == round(0.2 * (len(rows) - len(test_labels)))


def test_official_split_without_test_ids_or_with_unknown_ids_fails_clearly():
    rows = _records()
    with pytest.raises(PipelineError, match="test_ground_truth.json"):
        split_records(rows, SplitParams("official", 0.1, 0.1, 1), {})
    with pytest.raises(PipelineError, match="1 official test PMIDs are not in the data"):
        split_records(rows, SplitParams("official", 0.1, 0.1, 1), {"999999": "yes"})
    with pytest.raises(ValidationError, match="official"):  # no such split can be asked for
        SplitParams("alphabetical", 0.1, 0.1, 1)


def test_random_split_is_seeded_and_stratified():
    rows = _records(100)
    a = split_records(rows, SplitParams("random", 0.2, 0.1, 7), None)
    b = split_records(rows, SplitParams("random", 0.2, 0.1, 7), None)
    c = split_records(rows, SplitParams("random", 0.2, 0.1, 8), None)
    assert a == b and a["test"] != c["test"]
    stats = split_stats(a)
    assert stats["test"] == {"n": 20, "yes": 8, "no": 8, "maybe": 4}  # the 2:2:1 mix of the data


def test_cap_is_a_seeded_stratified_subset_not_the_first_n():
    rows = _records(100)
    subset = cap(rows, 10, seed=3)
    assert len(subset) == 10 and subset == cap(rows, 10, seed=3)
    assert subset != rows[:10]
    assert sorted(r["final_decision"] for r in subset) == sorted(["yes"] * 4 + ["no"] * 4 + ["maybe"] * 2)
    assert cap(rows, None, seed=3) == rows and cap(rows, 100, seed=3) == rows
    with pytest.raises(PipelineError, match="eval.max_samples asks for 500 questions but the split has only 100"):
        cap(rows, 500, seed=3, name="eval.max_samples")


def test_balanced_cap_takes_equal_decisions_where_the_split_has_them():
    rows = _records(100)  # 40 yes, 40 no, 20 maybe
    subset = balanced_cap(rows, 30, seed=3)
    assert subset == balanced_cap(rows, 30, seed=3) and subset != balanced_cap(rows, 30, seed=4)
    assert Counter(r["final_decision"] for r in subset) == {"yes": 10, "no": 10, "maybe": 10}
    assert subset == [r for r in rows if r in subset]  # the split's order kept
    # "maybe" has 20 of a fair 26: all of it, the rest shared by the others
    assert Counter(r["final_decision"] for r in balanced_cap(rows, 80, seed=3)) == {"yes": 30, "no": 30, "maybe": 20}
    assert balanced_cap(rows, 100, seed=3) == rows
    with pytest.raises(PipelineError, match="balanced sampling needs a number of questions: set train.max_samples"):
        balanced_cap(rows, None, seed=3, name="train.max_samples")
    with pytest.raises(PipelineError, match="asks for 101 questions but the split has only 100"):
        balanced_cap(rows, 101, seed=3)


def test_records_come_out_in_a_stable_order_whatever_the_ids():
    rows = [dict(r, pmid=p) for r, p in zip(_records(3), ["10", "abc", "9"])]
    assert [r["pmid"] for r in validate_records(rows)] == ["9", "10", "abc"]


def test_a_source_whose_files_disagree_names_the_record_both_files_and_both_values(tmp_path, official_dir):
    """The official directory's two files overlap on the test questions' decisions: an edited copy, or
    one mixed from two versions, stops the download with both sides, not a run on either."""
    records, labels = load_source(str(official_dir), None)
    assert len(records) == 40 and len(labels) == 10  # a copy whose files agree
    truth = json.loads((official_dir / "test_ground_truth.json").read_text())
    truth["1002"] = "no"  # ori_pqal.json says yes
    (official_dir / "test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(PipelineError) as error:
        load_source(str(official_dir), None)
    assert str(error.value).startswith(
        f"record 1002: {official_dir / 'ori_pqal.json'} says final_decision 'yes', "
        f"{official_dir / 'test_ground_truth.json'} says 'no': the two files disagree")
    truth["1002"] = "probably"
    (official_dir / "test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(PipelineError, match="test_ground_truth.json: record 1002: the label is 'probably', expected one of"):
        load_source(str(official_dir), None)
    # The labels named by data.test_ids (a local copy here) are compared the same way.
    (tmp_path / "labels.json").write_text(json.dumps({"1003": "yes"}))  # ori_pqal.json says no
    with pytest.raises(PipelineError, match=r"record 1003: .*ori_pqal.json says final_decision 'no', .*labels.json says 'yes'"):
        load_source(str(official_dir / "ori_pqal.json"), str(tmp_path / "labels.json"))


@pytest.mark.parametrize("name", ["pubmedqa.csv", "ori_pqal.json.gz", "records"])
def test_a_format_that_is_not_read_says_which_are(tmp_path, name):
    (tmp_path / name).write_text("pubid,question\n1,Does it?\n")
    with pytest.raises(PipelineError) as error:
        load_records(str(tmp_path / name))
    assert "is not read; data.source can be a directory with ori_pqal.json" in str(error.value)
    assert ".jsonl, .parquet, or a hub reference .yaml" in str(error.value) and "not valid JSON" not in str(error.value)


def test_a_file_whose_content_is_not_its_named_format_says_what_it_looks_like(tmp_path):
    """A data file named for one format and holding another: one line naming the file, the format its
    name asks for and what its bytes look like, never the reading library's traceback."""
    import json

    import pandas as pd

    from medqa.data.sources import load_records

    records = [{"pubid": 1, "question": "q?", "context": {"contexts": ["c"]}, "long_answer": "a",
                "final_decision": "yes"}] * 2
    jsonl = "\n".join(json.dumps(r) for r in records) + "\n"
    (tmp_path / "lines.parquet").write_text(jsonl)
    (tmp_path / "lines.json").write_text(jsonl)
    pd.DataFrame(records).to_parquet(tmp_path / "table.jsonl")
    (tmp_path / "document.jsonl").write_text(json.dumps(records, indent=2))
    for name, says in (("lines.parquet", "lines.parquet is not a Parquet file (ArrowInvalid); it looks like JSON "
                                         "lines, one record a line (.jsonl): name it for its format"),
                       ("lines.json", "lines.json is not valid JSON (line 2): Extra data; it looks like JSON lines"),
                       ("table.jsonl", "table.jsonl is not UTF-8 text: byte offset"),
                       ("document.jsonl", "document.jsonl line 1 is not valid JSON: Expecting value; the file looks "
                                          "like one JSON document (.json)")):
        with pytest.raises(PipelineError) as error:
            load_records(str(tmp_path / name))
        assert says in str(error.value), str(error.value)
    with pytest.raises(PipelineError, match="it looks like a Parquet file"):
        load_records(str(tmp_path / "table.jsonl"))
