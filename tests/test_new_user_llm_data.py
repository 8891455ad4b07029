"""Issue 22, "What a new user hit" (llm_head data input): a malformed JSON Lines line is skipped and
reported by its line number (``strict`` refuses it, naming it); a semicolon-separated CSV and an empty
file get what they are; a ``datasets.save_to_disk`` folder is read, a DatasetDict of one split gets
the seeded split, and a ``datasets.Dataset`` is extracted into a work folder from Python."""
import json

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import llm_head as lh  # noqa: E402
from llm_head import workdir as wd  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402

from test_llm_data import DEVICE, PAIRS  # noqa: E402  (the shared pairs file, the test device)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
COLUMNS = ["prompt", "chosen", "rejected", "group"]


@pytest.fixture(scope="module")
def real_pairs():
    """Real pairs of three countries, ten each (free-text answers)."""
    frame = pd.read_json(PAIRS, lines=True)
    keep = frame[frame["group"].isin(["Egypt", "Japan", "Brazil"])]
    return keep.groupby("group", sort=False).head(10).reset_index(drop=True)[COLUMNS]




def write_jsonl_with_bad_lines(frame, path):
    """The pairs as JSON Lines, with line 3 cut short and line 7 a JSON array (not an object)."""
    lines = [json.dumps(r) for r in frame.to_dict("records")]
    lines[2] = lines[2][:25]
    lines[6] = json.dumps(list(frame.iloc[6]))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------- item 1
def test_malformed_jsonl_lines_are_skipped_and_reported_by_line(real_pairs, tmp_path):
    path = write_jsonl_with_bad_lines(real_pairs, tmp_path / "pairs.jsonl")
    pairs = lh.load_preference_pairs(path)
    assert len(pairs) == len(real_pairs) - 2
    bad = pairs.skipped[pairs.skipped["reason"] == "malformed JSON line"]
    assert list(bad["line"]) == [3, 7]                                  # 1-based lines of the file
    assert "not valid JSON" in bad["detail"].iloc[0] and "list" in bad["detail"].iloc[1]
    report = pairs.report()
    assert "skipped 2 bad rows" in report and "2 malformed JSON lines (3, 7)" in report
    kept = pd.concat([real_pairs.iloc[:2], real_pairs.iloc[3:6], real_pairs.iloc[7:]], ignore_index=True)
    assert list(pairs.table["prompt"]) == list(kept["prompt"])
    assert list(pairs.table["chosen"]) == list(kept["chosen"])

    with pytest.raises(ValueError, match=r"pairs\.jsonl: line 3 is not valid JSON"):
        lh.load_preference_pairs(path, strict=True)
    frame, _ = lh.data.read_table(path)
    assert frame.attrs["bad_lines"][1][0] == 7
    with pytest.raises(ValueError, match=r"line 3 is not valid JSON"):
        lh.data.read_table(path, strict=True)


def test_cli_extract_skips_malformed_lines_and_strict_refuses(real_pairs, tmp_path, gemma_folder, capsys):
    path = write_jsonl_with_bad_lines(real_pairs, tmp_path / "pairs.jsonl")
    with pytest.raises(SystemExit, match=r"llm_head extract: .*line 3 is not valid JSON"):
        cli(["extract", "--data", str(path), "--model", gemma_folder, "--workdir", str(tmp_path / "w0"),
             "--device", DEVICE, "--strict"])
    assert not (tmp_path / "w0" / "dataset.json").exists()
    assert cli(["extract", "--data", str(path), "--model", gemma_folder, "--workdir", str(tmp_path / "w"),
                "--device", DEVICE, "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 malformed JSON lines (3, 7)" in out
    skipped = wd.read_dataset(str(tmp_path / "w"))["skipped"]
    assert [s["line"] for s in skipped if s["reason"] == "malformed JSON line"] == ["3", "7"]


# ---------------------------------------------------------------------------- item 2
def test_semicolon_csv_is_read_and_empty_file_is_named_empty(real_pairs, tmp_path):
    semi = tmp_path / "semi.csv"
    real_pairs.to_csv(semi, sep=";", index=False)
    pairs = lh.load_preference_pairs(semi)
    assert len(pairs) == len(real_pairs)
    assert list(pairs.table["chosen"]) == list(real_pairs["chosen"])   # text with commas stays whole
    tab = tmp_path / "tab.csv"
    real_pairs.to_csv(tab, sep="\t", index=False)
    assert list(lh.load_preference_pairs(tab).table["rejected"]) == list(real_pairs["rejected"])
    comma = tmp_path / "comma.csv"          # a comma CSV whose texts hold semicolons stays comma-separated
    odd = real_pairs.assign(prompt=real_pairs["prompt"] + "; a; b; c")
    odd.to_csv(comma, index=False)
    assert list(lh.load_preference_pairs(comma).table["prompt"]) == list(odd["prompt"])
    # a frame read with the wrong delimiter: one column holding the names; the message says so
    wrong = pd.read_csv(semi, dtype=str)
    with pytest.raises(ValueError, match=r"looks ';'-separated"):
        lh.load_preference_pairs(wrong)

    for name in ("empty.jsonl", "empty.csv", "empty.json", "blank.jsonl"):
        path = tmp_path / name
        path.write_text("\n\n" if name.startswith("blank") else "")
        with pytest.raises(ValueError, match=r"is empty"):
            lh.load_preference_pairs(path)
    with pytest.raises(ValueError, match=r"is empty"):
        lh.load_preference_pairs(pd.DataFrame())


# ---------------------------------------------------------------------------- item 3
def test_save_to_disk_folder_and_single_split_datasetdict(real_pairs, tmp_path):
    ds = datasets.Dataset.from_pandas(real_pairs, preserve_index=False)
    ds.save_to_disk(tmp_path / "ds")
    pairs = lh.load_preference_pairs(str(tmp_path / "ds"))
    assert len(pairs) == len(real_pairs) and pairs.source == str(tmp_path / "ds")
    only_train = datasets.DatasetDict({"train": ds})
    only_train.save_to_disk(tmp_path / "dd")
    for source in (only_train, str(tmp_path / "dd")):
        pairs = lh.load_preference_pairs(source)
        splits = lh.assign_splits(pairs, seed=0)
        assert set(splits) == {"train", "val", "test"}                # the seeded 80/10/10, not all train
    two = datasets.DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 30))})
    pairs = lh.load_preference_pairs(two)
    assert list(lh.assign_splits(pairs).value_counts().sort_index()) == [10, 20]   # test, train as given
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"is a folder"):
        lh.load_preference_pairs(str(tmp_path / "plain"))


def test_dataset_object_and_folder_extract_into_a_work_folder(real_pairs, tmp_path, gemma_folder):
    ds = datasets.Dataset.from_pandas(real_pairs, preserve_index=False)
    work = tmp_path / "from-python"
    assert lh.extract_to_workdir(ds, work, model=gemma_folder, device=DEVICE, limit=3) == 0
    record = wd.read_dataset(str(work))
    assert record["groups"] == ["Egypt", "Japan", "Brazil"] and len(record["pairs"]) == 9
    with pytest.raises(TypeError, match=r"unknown option"):
        lh.extract_to_workdir(ds, work, modle=gemma_folder)
    ds.save_to_disk(tmp_path / "ds")
    assert cli(["extract", "--data", str(tmp_path / "ds"), "--model", gemma_folder, "--workdir",
                str(tmp_path / "from-cli"), "--device", DEVICE, "--limit", "3"]) == 0
    _, record = lh.load_problem(str(tmp_path / "from-cli"))
    assert record["groups"] == ["Egypt", "Japan", "Brazil"] and record["source"] == str(tmp_path / "ds")
