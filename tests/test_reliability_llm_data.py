"""Issue 18, "Honest certificates and nothing lost" — the llm_head reader and extraction items.

Each test is named after its item: 2 (group labels kept as they are, never merged across types,
missing labels counted), 3 (nothing re-typed on reading, true skip reasons), 4 (the weights
fingerprint covers every weight), 7 (over-long items refused or truncated before any forward pass),
15 (a UTF-8 byte-order mark is ignored).
"""
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llm_head as lh  # noqa: E402

from conftest import SHARED  # noqa: E402

PAIRS = SHARED / "data" / "global_opinions_pairs.jsonl"
OPINIONS = SHARED / "data" / "global_opinions_partial.csv"
DEVICE = os.environ.get("LLM_HEAD_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_jsonl(path, records, bom=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return str(path)


def pair(prompt, chosen=" a", rejected=" b", **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


# ============================================================================ item 2: group labels
def test_item2_number_and_string_labels_are_not_merged(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [pair("q1", group=1), pair("q2", group="1"), pair("q3", group=1)])
    with pytest.raises(ValueError, match=r"mixed\.jsonl: group column 'group'.*1 \(number, 2 rows\) and "
                                         r"'1' \(string, 1 row\)"):
        lh.load_preference_pairs(path)
    frame = pd.DataFrame([pair("q1", country=True), pair("q2", country="True")])
    with pytest.raises(ValueError, match=r"group column 'country'.*True \(boolean, 1 row\)"):
        lh.pairs_from_frame(frame, group_column="country")


def test_item2_labels_of_one_type_keep_their_names(tmp_path):
    path = write_jsonl(tmp_path / "numbers.jsonl", [pair("q1", group=3), pair("q2", group=3.0), pair("q3", group=12)])
    assert lh.load_preference_pairs(path).groups == ("3", "12")          # one JSON type: numbers
    path = write_jsonl(tmp_path / "mixed-ok.jsonl", [pair("q1", group="us"), pair("q2", group=7)])
    assert lh.load_preference_pairs(path).groups == ("us", "7")          # different names: no clash


def test_item2_missing_group_labels_are_bad_rows(tmp_path):
    records = [pair("q1", group="us"), pair("q2", group=None), pair("q3"), pair("q4", group=""),
               pair("q5", group="fr")]
    pairs = lh.load_preference_pairs(write_jsonl(tmp_path / "gaps.jsonl", records))
    assert pairs.groups == ("us", "fr")
    assert dict(zip(pairs.skipped["row"], pairs.skipped["reason"])) == {1: "missing group", 2: "missing group",
                                                                        3: "empty group"}
    assert "skipped 3 bad rows (missing group: 2, empty group: 1)" in pairs.report()
    # an integer column with gaps (float NaN in pandas) and pandas' own missing values
    frame = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "chosen": [" x"] * 4, "rejected": [" y"] * 4,
                          "group": pd.array([1, None, 2, None], dtype="Int64")})
    for column in (frame["group"], frame["group"].astype("float64"), frame["group"].astype(object)):
        pairs = lh.pairs_from_frame(frame.assign(group=column))
        assert pairs.groups == ("1", "2") and pairs.skipped["reason"].tolist() == ["missing group"] * 2
    for source in (pd.DataFrame(records), pd.DataFrame(records).to_parquet(tmp_path / "g.parquet") or
                   str(tmp_path / "g.parquet")):
        pairs = lh.load_preference_pairs(source)
        assert not {"None", "nan", "NaN", "<NA>"} & set(pairs.groups) and len(pairs.skipped) == 3


# ============================================================================ item 3: nothing re-typed
def test_item3_jsonl_codes_and_numeric_answers_stay_text(tmp_path):
    records = [pair("q1", " 3", " 4", group="01"), pair("q2", " 3", " 5", group="1"),
               pair("q3", "10", "2", group="01")]
    for path in (write_jsonl(tmp_path / "codes.jsonl", records),
                 str(tmp_path / "codes.json")):
        if path.endswith(".json"):
            with open(path, "w") as fh:
                json.dump(records, fh)
        pairs = lh.load_preference_pairs(path)
        assert pairs.groups == ("01", "1"), path
        assert pairs.table["chosen"].tolist() == [" 3", " 3", "10"] and len(pairs.skipped) == 0
    # pandas' own to_json layout (an object of columns) and JSON Lines under a .json name
    frame = pd.DataFrame(records)
    frame.to_json(tmp_path / "columns.json")
    assert lh.load_preference_pairs(str(tmp_path / "columns.json")).table["rejected"].tolist() == [" 4", " 5", "2"]
    frame.to_json(tmp_path / "lines.json", orient="records", lines=True)
    assert lh.load_preference_pairs(str(tmp_path / "lines.json")).groups == ("01", "1")


def test_item3_csv_reads_every_cell_as_text(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("prompt,chosen,rejected,group\n"
                    "q1,None,N/A,NA\n"          # Namibia, and two answers that are words
                    "q2,1,2,NA\n"               # purely numeric answers
                    "q3,nan,null,01\n"
                    "q4,x,y,1\n"
                    "q5,,y,1\n"                 # an empty cell: empty text
                    "q6,x,y,\n")                # an empty group cell
    pairs = lh.load_preference_pairs(str(path))
    assert pairs.groups == ("NA", "01", "1")
    assert pairs.table["chosen"].tolist() == ["None", "1", "nan", "x"]
    assert pairs.table["rejected"].tolist() == ["N/A", "2", "null", "y"]
    assert dict(zip(pairs.skipped["row"], pairs.skipped["reason"])) == {4: "chosen: empty text", 5: "empty group"}
    assert "skipped 2 bad rows (chosen: empty text: 1, empty group: 1)" in pairs.report()


def test_item3_missing_values_only_where_asked(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("prompt,chosen,rejected,group\nq1,None,N/A,NA\nq2,x,y,NA\nq3,x,y,N/A\n")
    pairs = lh.load_preference_pairs(str(path), na_values=["N/A"])
    assert pairs.groups == ("NA",)
    assert dict(zip(pairs.skipped["row"], pairs.skipped["reason"])) == {0: "rejected: missing text",
                                                                        2: "missing group"}
    jsonl = write_jsonl(tmp_path / "na.jsonl", [pair("q1", "None", " b", group="NA"), pair("q2", group="x")])
    assert lh.load_preference_pairs(jsonl).groups == ("NA", "x")
    assert lh.load_preference_pairs(jsonl, na_values="None").skipped["reason"].tolist() == ["chosen: missing text"]


def test_item3_skip_report_states_the_true_reason(tmp_path):
    records = [pair("q1", 3, " b", group="g"), pair("q2", None, " b", group="g"), pair("q3", "  ", " b", group="g"),
               pair("q4", " b", " b", group="g"), pair("q5", group=["g"]), pair("q6", group="g")]
    records[1].pop("chosen")
    records.append(pair("q7", [{"role": "assistant"}], " b", group="g"))
    pairs = lh.load_preference_pairs(write_jsonl(tmp_path / "bad.jsonl", records))
    assert dict(zip(pairs.skipped["row"], pairs.skipped["reason"])) == {
        0: "chosen: text is int, not a string", 1: "chosen: missing text", 2: "chosen: empty text",
        3: "chosen == rejected", 4: "group label is list, not a string or number",
        6: "chosen: text is list, not a string"}


def test_item3_conversational_jsonl_still_works(tmp_path):
    records = [{"prompt": [{"role": "user", "content": f"question {i}"}],
                "chosen": [{"role": "assistant", "content": "3"}],
                "rejected": [{"role": "assistant", "content": "01"}], "group": g}
               for i, g in enumerate(["01", "1", "01"])]
    pairs = lh.load_preference_pairs(write_jsonl(tmp_path / "conv.jsonl", records))
    assert pairs.conversational and pairs.groups == ("01", "1")
    assert pairs.table["chosen"][0] == [{"role": "assistant", "content": "3"}]
    assert lh.items_from_pairs(pairs)["candidates"][0][1] == [{"role": "assistant", "content": "01"}]


def test_item3_real_files_read_as_before():
    pairs = lh.load_preference_pairs(str(PAIRS))
    assert len(pairs) == 2969 and len(pairs.groups) == 12 and len(pairs.skipped) == 0
    raw = [json.loads(line) for line in open(PAIRS)]
    assert pairs.table["chosen"].tolist() == [r["chosen"] for r in raw]
    assert pairs.table["question_id"].tolist() == [r["question_id"] for r in raw]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opinions = lh.load_preference_pairs(str(OPINIONS))
        items = lh.load_global_opinions(str(OPINIONS))
    assert len(opinions) == 956 and len(items) == 956
    assert opinions.group_sizes().to_dict() == {"Nigeria": 259, "Egypt": 178, "India (Current national sample)": 128,
                                                "China": 188, "Japan": 203}


def test_item3_global_opinions_question_none_is_text(tmp_path):
    path = tmp_path / "go.csv"
    path.write_text('question,selections,options\n'
                    'None,"defaultdict(<class \'list\'>, {\'Japan\': [0.7, 0.3]})","[\'NA\', \'None\']"\n'
                    ',"defaultdict(<class \'list\'>, {\'Japan\': [0.5, 0.5]})","[\'x\', \'y\']"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = lh.load_global_opinions(str(path), countries=["Japan"])
    assert len(items) == 1 and "on: None\n" in items.table["prompt"][0]
    assert items.skipped["reason"].tolist() == ["empty question"]


# ============================================================================ item 15: byte-order mark
def test_item15_bom_jsonl_reads(tmp_path):
    path = write_jsonl(tmp_path / "bom.jsonl", [pair("q1", group="us"), pair("q2", group="fr")], bom=True)
    pairs = lh.load_preference_pairs(path)
    assert pairs.groups == ("us", "fr") and pairs.table["prompt"].tolist() == ["q1", "q2"]


def test_item15_bom_csv_and_json_read(tmp_path):
    csv = tmp_path / "bom.csv"
    csv.write_bytes("\ufeffprompt,chosen,rejected,group\nq1,a,b,us\n".encode())
    assert list(lh.load_preference_pairs(str(csv)).table.columns[:4]) == ["prompt", "chosen", "rejected", "group"]
    js = tmp_path / "bom.json"
    js.write_bytes(("\ufeff" + json.dumps([pair("q1", group="us")])).encode())
    assert lh.load_preference_pairs(str(js)).groups == ("us",)
    go = tmp_path / "bom-go.csv"
    go.write_bytes(("\ufeff" + open(OPINIONS, encoding="utf-8").read()).encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(lh.load_global_opinions(str(go))) == 956
