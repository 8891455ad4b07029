"""llm_head on anyone's grouped preference data: TRL's standard and conversational formats, files,
``datasets`` objects, splits by prompt, bad rows, a safe work folder and an export that reloads."""
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import llm_head as lh  # noqa: E402
from llm_head import workdir as wd  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402

from conftest import SHARED  # noqa: E402

PAIRS = SHARED / "data" / "global_opinions_pairs.jsonl"
DEVICE = os.environ.get("LLM_HEAD_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shared_pairs():
    """A few real pairs of three countries (free-text, multi-token answers)."""
    frame = pd.read_json(PAIRS, lines=True)
    keep = frame[frame["group"].isin(["Egypt", "Japan", "Brazil"])]
    return keep.groupby("group", sort=False).head(14).reset_index(drop=True)




def conversational(frame):
    out = frame.copy()
    out["prompt"] = [[{"role": "user", "content": p}] for p in frame["prompt"]]
    for col in ("chosen", "rejected"):
        out[col] = [[{"role": "assistant", "content": a.strip()}] for a in frame[col]]
    return out


# ============================================================================ the loader
def test_standard_pairs_bad_rows_are_counted_and_skipped():
    frame = pd.DataFrame({
        "prompt": ["q1", "q2", "", "q4", "q5", "q6", "q7"],
        "chosen": [" a", " b", " c", " d", " same", 7, " g"],
        "rejected": [" x", " y", " z", " w", " same", " f", " h"],
        "group": ["us", "fr", "us", None, "fr", "us", 3]})
    pairs = lh.pairs_from_frame(frame)
    assert pairs.table["prompt"].tolist() == ["q1", "q2", "q7"]
    assert pairs.groups == ("us", "fr", "3")                   # integer labels become names
    reasons = dict(zip(pairs.skipped["row"], pairs.skipped["reason"]))
    assert reasons == {2: "prompt: empty text", 3: "missing group", 4: "chosen == rejected",
                       5: "chosen: text is int, not a string"}
    assert "skipped 4 bad rows" in pairs.report()


def test_wrong_file_gives_one_clear_error(tmp_path):
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"notes\.csv.*found columns \['a', 'b'\]"):
        lh.load_preference_pairs(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x", "chosen": "y"\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl could not be read as jsonl"):
        lh.load_preference_pairs(str(broken))
    missing_group = tmp_path / "nogroup.jsonl"
    missing_group.write_text('{"prompt": "x", "chosen": "y", "rejected": "z", "country": "a"}\n')
    with pytest.raises(ValueError, match="--group-column"):
        lh.load_preference_pairs(str(missing_group))
    assert len(lh.load_preference_pairs(str(missing_group), group_column="country")) == 1
    with pytest.raises(ValueError, match="no such file"):
        lh.load_preference_pairs(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="limit"):
        lh.load_preference_pairs(str(missing_group), group_column="country", limit=0)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_reads_the_same_pairs(tmp_path, shared_pairs, suffix):
    path = tmp_path / f"pairs{suffix}"
    {".jsonl": lambda p: shared_pairs.to_json(p, orient="records", lines=True),
     ".json": lambda p: shared_pairs.to_json(p, orient="records"),
     ".csv": lambda p: shared_pairs.to_csv(p, index=False),
     ".parquet": lambda p: shared_pairs.to_parquet(p)}[suffix](path)
    pairs = lh.load_preference_pairs(str(path))
    assert pairs.table["chosen"].tolist() == shared_pairs["chosen"].tolist()
    assert pairs.groups == ("Egypt", "Japan", "Brazil") or set(pairs.groups) == {"Egypt", "Japan", "Brazil"}


def test_datasets_objects_and_conversational_format(shared_pairs):
    ds = datasets.Dataset.from_pandas(shared_pairs)
    pairs = lh.load_preference_pairs(ds)
    assert len(pairs) == len(shared_pairs) and not pairs.conversational
    split = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(shared_pairs.iloc[:30]),
                                  "validation": datasets.Dataset.from_pandas(shared_pairs.iloc[30:])})
    pairs = lh.load_preference_pairs(split)
    assert set(pairs.table["split"]) == {"train", "val"}
    assert lh.assign_splits(pairs).tolist() == pairs.table["split"].tolist()   # a given split is kept
    conv = lh.load_preference_pairs(datasets.Dataset.from_pandas(conversational(shared_pairs)))
    assert conv.conversational and conv.table["prompt"][0][0]["role"] == "user"


def test_split_by_prompt_or_column_never_shares_a_prompt(shared_pairs):
    frame = pd.concat([shared_pairs, shared_pairs.assign(group="Copy")], ignore_index=True)  # same prompts twice
    pairs = lh.pairs_from_frame(frame)
    for split_by in (None, "question_id"):
        splits = lh.assign_splits(pairs, seed=1, split_by=split_by)
        key = pairs.table["prompt"] if split_by is None else pairs.table["question_id"]
        assert (splits.groupby(key.to_numpy()).nunique() == 1).all()
        assert set(splits) == {"train", "val", "test"}
    assert not lh.assign_splits(pairs, seed=1).equals(lh.assign_splits(pairs, seed=2))
    with pytest.raises(ValueError, match="split_by"):
        lh.assign_splits(pairs, split_by="nope")


def test_items_share_prompts_and_collect_candidates(shared_pairs):
    frame = pd.concat([shared_pairs.iloc[:3], shared_pairs.iloc[:1].assign(rejected=" Something else")])
    pairs = lh.pairs_from_frame(frame)
    items = lh.items_from_pairs(pairs)
    assert len(items) == 3 and len(items["candidates"][0]) == 3       # first prompt: 3 distinct answers
    index = lh.pair_indices(pairs.table, items, pairs.groups)
    assert index["item"].tolist() == [0, 1, 2, 0] and index["rejected"].tolist()[3] == 2


# ============================================================================ tokenisation
def test_rendering_follows_trl(tokenizer):
    from llm_head.extract import encode_item
    prompt, answers = "Opinion of people in Egypt on: X?\nAnswer:", [" Very serious", " Not at all"]
    p_ids, a_ids, bad = encode_item(tokenizer, prompt, answers, lh.Rendering(add_eos=True))
    assert bad == 0 and p_ids == tokenizer(prompt).input_ids
    assert a_ids[0] == tokenizer(prompt + answers[0] + tokenizer.eos_token).input_ids[len(p_ids):]
    assert a_ids[0][-1] == tokenizer.eos_token_id
    chat_p, chat_a, _ = encode_item(tokenizer, prompt, answers, lh.Rendering(chat_template=True))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    assert tokenizer.decode(chat_p) == rendered
    assert tokenizer.decode(chat_a[0]).startswith(" Very serious")


# ============================================================================ CLI end to end
def _extract(data, work, gemma_folder, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli(["extract", "--data", str(data), "--model", gemma_folder, "--workdir", str(work),
                    "--device", DEVICE, "--shard-items", "8", *extra])


def extracted_work_folder(tmp, pairs, gemma_folder):
    """``pairs`` written as TRL-format JSONL under ``tmp`` and extracted into ``tmp/work`` (the tiny Gemma)."""
    data = tmp / "pairs.jsonl"
    pairs.to_json(data, orient="records", lines=True)
    folder = tmp / "work"
    assert _extract(data, folder, gemma_folder) == 0
    return folder


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_cli_end_to_end_on_trl_pairs(tmp_path, shared_pairs, gemma_folder, fmt):
    data = tmp_path / "pairs.jsonl"
    (shared_pairs if fmt == "standard" else conversational(shared_pairs)).to_json(data, orient="records",
                                                                                  lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder, "--split-by", "question_id") == 0
    with open(work / "dataset.json") as fh:
        record = json.load(fh)
    assert record["rendering"] == {"chat_template": fmt == "conversational", "add_eos": fmt == "standard"}
    assert cli(["train", "--workdir", str(work), "--loss", "sigmoid", "--radius", "0.5", "--run", "gr"]) == 0
    assert cli(["train", "--workdir", str(work), "--loss", "sigmoid", "--radius", "0.5", "--method", "vanilla",
                "--run", "van"]) == 0
    with open(work / "runs" / "gr" / "settings.json") as fh:
        settings = json.load(fh)
    assert settings["certificate"]["converged"] and settings["split_by"] == "question_id"
    assert cli(["evaluate", "--workdir", str(work), "--run", "gr", "--split", "train"]) == 0
    metrics = pd.read_csv(work / "runs" / "gr" / "metrics_train.csv", index_col=["kind", "group"])
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/accuracies"} <= set(metrics.columns)
    assert list(metrics.index[-4:]) == [("aggregate", "worst"), ("aggregate", "extreme"),
                                        ("aggregate", "mean over groups"), ("aggregate", "mean over pairs")]
    problem, _ = lh.load_problem(str(work), seed=0, split_by="question_id")
    by_question = problem.pairs.assign(q=shared_pairs["question_id"].to_numpy()).groupby("q")["split"].nunique()
    assert (by_question == 1).all()                                   # no question in two splits
    assert cli(["export", "--workdir", str(work), "--run", "gr", "--delta-only"]) == 0   # model from the folder
    assert os.path.exists(work / "runs" / "gr" / "model" / "head_delta.safetensors")


def test_work_folder_is_safe(tmp_path, shared_pairs, gemma_folder):
    data = tmp_path / "pairs.jsonl"
    shared_pairs.to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    with pytest.raises(SystemExit, match="plain name"):
        cli(["train", "--workdir", str(work), "--run", "../escape"])
    assert cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", "r"]) == 0
    other = tmp_path / "other.jsonl"
    shared_pairs.iloc[:20].to_json(other, orient="records", lines=True)
    with pytest.raises(SystemExit, match="trained on other features"):
        _extract(other, work, gemma_folder)                           # refused: run r would break
    assert cli(["evaluate", "--workdir", str(work), "--run", "r"]) == 0   # the old features are intact
    assert _extract(other, work, gemma_folder, "--force") == 0        # versioned
    assert [d for d in os.listdir(work) if d.startswith("runs-")]
    with open(work / "features.safetensors", "r+b") as fh:             # a corrupted feature file
        fh.seek(500)
        fh.write(b"\x00\x00\x00\x00")
    with pytest.raises(SystemExit, match="checksum"):
        cli(["train", "--workdir", str(work), "--run", "s"])
    with pytest.raises(SystemExit):
        _extract(data, tmp_path / "w2", gemma_folder, "--limit", "0")


def _trained_run(tmp_path, shared_pairs, gemma_folder):
    """The shared pairs as JSONL, extracted into a work folder, and one run ``r`` trained there."""
    data = tmp_path / "pairs.jsonl"
    shared_pairs.to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    assert cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", "r"]) == 0
    return data, work


def test_evaluate_refuses_a_run_of_other_features(tmp_path, shared_pairs, gemma_folder):
    data, work = _trained_run(tmp_path, shared_pairs, gemma_folder)
    settings_path = work / "runs" / "r" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings["features_sha256"] = "0" * 64
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="trained on other features"):
        cli(["evaluate", "--workdir", str(work), "--run", "r"])


def test_small_data_with_a_missing_split_is_reported(tmp_path, shared_pairs, gemma_folder, capsys):
    tiny = shared_pairs.groupby("group", sort=False).head(2).assign(split="train")
    tiny.loc[tiny.index[0], "split"] = "test"
    data = tmp_path / "tiny.jsonl"
    tiny.to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    assert cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", "r"]) == 0
    assert "no pairs in split 'val'" in capsys.readouterr().out
    assert os.path.exists(work / "runs" / "r" / "metrics_test.csv")
    assert not os.path.exists(work / "runs" / "r" / "metrics_val.csv")


# ============================================================================ exactness of the exported head
def test_multi_token_policy_equals_the_exported_models_sequence_scores(tmp_path, shared_pairs, gemma_folder):
    data = tmp_path / "pairs.jsonl"
    shared_pairs.to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    assert cli(["train", "--workdir", str(work), "--loss", "sigmoid", "--radius", "0.5", "--run", "r"]) == 0
    assert cli(["export", "--workdir", str(work), "--run", "r"]) == 0
    tuned = transformers.AutoModelForCausalLM.from_pretrained(work / "runs" / "r" / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(work / "runs" / "r" / "model")
    problem, record = lh.load_problem(str(work))
    theta = np.load(work / "runs" / "r" / "theta.npy")
    scores = problem.features.candidate_scores(theta)
    items = wd.items_table(record)
    rendering = lh.Rendering(**record["rendering"])
    from llm_head.extract import encode_item
    checked = 0
    for row in problem.pairs.head(6).itertuples():
        prompt, cands = items["prompt"][row.item], items["candidates"][row.item]
        p_ids, a_ids, _ = encode_item(tok, prompt, cands, rendering)
        f = []
        for k in (row.chosen, row.rejected):
            with torch.inference_mode():
                logits = tuned(torch.tensor([p_ids + a_ids[k]])).logits[0].double().numpy()
            f.append(sum(logits[len(p_ids) - 1 + t, a_ids[k][t]] for t in range(len(a_ids[k]))))
            checked += len(a_ids[k]) > 1
        offset = problem.features.candidate_offsets[row.item]
        ours = scores[offset + row.chosen] - scores[offset + row.rejected]
        # the candidate-set policy over the pair: σ(f(y_w) − f(y_l)), from the exported full model
        assert ours == pytest.approx(f[0] - f[1], abs=1e-4)
    assert checked > 0                                                 # multi-token answers were checked


@pytest.mark.slow
def test_export_reload_of_the_smollm2_head(tmp_path, shared_pairs):
    """The real GGUF model: de-quantised on export, reloaded by from_pretrained without gguf."""
    data = tmp_path / "pairs.jsonl"
    shared_pairs.groupby("group", sort=False).head(3).to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["extract", "--data", str(data), "--model", "smollm2", "--workdir", str(work),
                    "--device", DEVICE, "--dtype", "float32"]) == 0
        assert cli(["train", "--workdir", str(work), "--radius", "0.2", "--run", "r"]) == 0
        assert cli(["export", "--workdir", str(work), "--run", "r"]) == 0
    folder = work / "runs" / "r" / "model"
    tuned = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(tuned.config, "quantization_config", None) is None
    features, theta_ref, _, _, _ = wd.load_workdir(str(work))
    theta = np.load(work / "runs" / "r" / "theta.npy")
    rows = tuned.get_output_embeddings().weight.detach()[torch.as_tensor(features.vocab)].double().numpy()
    np.testing.assert_allclose(rows.ravel(), theta, atol=1e-6)
    assert not np.allclose(theta, theta_ref)


def test_a_run_is_not_silently_replaced(tmp_path, shared_pairs, gemma_folder):
    data, work = _trained_run(tmp_path, shared_pairs, gemma_folder)
    assert cli(["export", "--workdir", str(work), "--run", "r", "--delta-only"]) == 0
    with pytest.raises(SystemExit, match="exists"):
        cli(["train", "--workdir", str(work), "--radius", "0.3", "--run", "r"])
    assert cli(["train", "--workdir", str(work), "--radius", "0.3", "--run", "r", "--overwrite"]) == 0
    assert not os.path.exists(work / "runs" / "r" / "model")           # the stale export went with it
    umask = os.umask(0)
    os.umask(umask)
    for path in (work / "features.safetensors", work / "dataset.json"):
        assert (os.stat(path).st_mode & 0o777) == 0o666 & ~umask        # readable like any file


def test_a_mistyped_path_is_no_hub_id(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        lh.load_preference_pairs(str(tmp_path / "my-pairs.jsnol"))
    with pytest.raises(ValueError, match="no such file"):
        lh.load_preference_pairs("pairs.tsv")


def test_implicit_storage_trains_the_same_head_from_a_memory_mapped_cache(tmp_path, shared_pairs, gemma_folder):
    """--storage implicit: S from the memory-mapped hidden states (llm_head.features.PairDifferenceOperator)
    gives the CSR run's certified head."""
    data = tmp_path / "pairs.jsonl"
    shared_pairs.to_json(data, orient="records", lines=True)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    for storage in ("csr", "implicit", "auto"):
        assert cli(["train", "--workdir", str(work), "--loss", "sigmoid", "--radius", "0.5", "--storage", storage,
                    "--run", storage]) == 0
        with open(work / "runs" / storage / "settings.json") as fh:
            # what was used is recorded (auto: CSR, this S being far below the CSR limit)
            assert json.load(fh)["storage_used"] == ("implicit" if storage == "implicit" else "csr")
    thetas = [np.load(work / "runs" / s / "theta.npy") for s in ("csr", "implicit")]
    np.testing.assert_allclose(thetas[1], thetas[0], rtol=1e-8, atol=1e-10)
    with open(work / "runs" / "implicit" / "settings.json") as fh:
        settings = json.load(fh)
    assert settings["certificate"]["converged"] and settings["storage"] == "implicit"
    assert cli(["evaluate", "--workdir", str(work), "--run", "implicit", "--split", "train"]) == 0
    problem, _ = lh.load_problem(str(work), storage="implicit")
    assert isinstance(problem.features.hidden, np.memmap)
    assert problem.data("train").is_operator
    eager, *_ = wd.load_workdir(str(work))
    np.testing.assert_array_equal(np.asarray(problem.features.hidden), eager.hidden)
