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

from conftest import SHARED, tiny_gemma  # noqa: E402

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


# ============================================================================ models for items 4 and 7
def tiny_loaded(tokenizer, max_positions=1024):
    return lh.prepare_model(tiny_gemma(len(tokenizer), max_positions), tokenizer, device=DEVICE, dtype=torch.float32)


PROMPTS = ["Opinion of people in Japan on: is tea better than coffee?\nAnswer:",
           "Opinion of people in Egypt on: should cities plant more trees along their streets?\nAnswer:"]
CANDIDATES = [[" Yes", " No, not really"], [" Agree", " Disagree strongly"]]


# ============================================================================ item 4: the weights fingerprint
def test_item4_fingerprint_covers_entries_past_4096(tokenizer):
    loaded = tiny_loaded(tokenizer)
    weight = loaded.model.model.layers[1].mlp.down_proj.weight        # 32 x 64 = 2048 entries: hashed whole
    embed = loaded.model.model.embed_tokens.weight                    # |V| x 32: far past 4096
    before = lh.prepare_model(loaded.model, tokenizer, device=DEVICE, dtype=torch.float32).spec["weights"]
    for tensor, index in ((embed, embed.numel() - 1), (embed, 4096 + 7), (weight, weight.numel() - 1)):
        old = tensor.view(-1)[index].item()
        with torch.no_grad():
            tensor.view(-1)[index] = old + 0.5
        after = lh.prepare_model(loaded.model, tokenizer, device=DEVICE, dtype=torch.float32).spec["weights"]
        assert after != before, index
        with torch.no_grad():
            tensor.view(-1)[index] = old                  # restored exactly: the same fingerprint
        assert lh.prepare_model(loaded.model, tokenizer, device=DEVICE, dtype=torch.float32).spec["weights"] == before


def test_item4_changed_weights_are_extracted_again(tokenizer, tmp_path):
    loaded = tiny_loaded(tokenizer)
    kw = dict(cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    first = lh.extract_features(loaded, PROMPTS, CANDIDATES, **kw)
    ids = sorted({t for p in PROMPTS for t in tokenizer(p).input_ids if t * 32 >= 4096 + 32})
    with torch.no_grad():                         # embedding rows of the prompts' tokens, all past entry 4096
        loaded.model.model.embed_tokens.weight[ids] *= 1.5
    changed = lh.prepare_model(loaded.model, tokenizer, device=DEVICE, dtype=torch.float32)
    again = lh.extract_features(changed, PROMPTS, CANDIDATES, **kw)
    fresh = lh.extract_features(changed, PROMPTS, CANDIDATES, batch_size=2, progress=False)
    np.testing.assert_array_equal(again.hidden, fresh.hidden)
    assert not np.allclose(again.hidden, first.hidden)
    assert len(os.listdir(tmp_path / "cache")) == 2                    # a new cache key, a new folder


# ============================================================================ item 7: the context length
def test_item7_over_long_items_are_refused_before_any_forward(tokenizer, tmp_path):
    loaded = tiny_loaded(tokenizer, max_positions=20)
    calls = []
    hook = loaded.model.base_model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    try:
        from llm_head.extract import encode_item
        lengths = [len(p_ids) + max(map(len, a_ids)) for p_ids, a_ids, _ in
                   (encode_item(tokenizer, p, c) for p, c in zip(PROMPTS, CANDIDATES))]
        assert min(lengths) > 20 and lengths[1] > lengths[0]
        with pytest.raises(ValueError, match=r"2 of 2 items are longer than 20 tokens \(the model's "
                                             r"config\.max_position_embeddings\); the longest, item 1, has "
                                             rf"{max(lengths)} tokens .*truncation='keep_end'"):
            lh.extract_features(loaded, PROMPTS, CANDIDATES, cache_dir=tmp_path / "cache", progress=False)
        assert not calls and not os.path.exists(tmp_path / "cache")      # refused before the cache or a pass
        big = tiny_loaded(tokenizer)
        n = lengths[0]                               # item 0 fits exactly, item 1 does not
        with pytest.raises(ValueError, match=rf"1 of 2 items are longer than {n} tokens \(max_length={n}\)"):
            lh.extract_features(big, PROMPTS, CANDIDATES, max_length=n, progress=False)
        with pytest.raises(ValueError, match="max_length=2000 is beyond the model's context of 1024"):
            lh.extract_features(big, PROMPTS, CANDIDATES, max_length=2000, progress=False)
        with pytest.raises(ValueError, match=r"2 of 2 items have an answer of 3 tokens or more"):
            lh.extract_features(big, PROMPTS, CANDIDATES, max_length=3, truncation="keep_end", progress=False)
        with pytest.raises(ValueError, match="truncation must be one of"):
            lh.extract_features(big, PROMPTS, CANDIDATES, truncation="left", progress=False)
    finally:
        hook.remove()


def test_item7_keep_end_cuts_prompts_from_the_left(tokenizer, tmp_path):
    from llm_head.extract import Rendering, encode_item
    loaded = tiny_loaded(tokenizer)
    enc = [encode_item(tokenizer, p, c, Rendering()) for p, c in zip(PROMPTS, CANDIDATES)]
    longest = [len(e[0]) + max(map(len, e[1])) for e in enc]
    limit = longest[1] - 2                        # item 0 fits, item 1 does not
    assert longest[0] <= limit < longest[1]
    with pytest.warns(UserWarning, match=rf"truncated the prompts of 1 of 2 items from the left to fit {limit} "
                                         rf"tokens \(max_length={limit}.*the longest item had {longest[1]} tokens"):
        cut = lh.extract_features(loaded, PROMPTS, CANDIDATES, max_length=limit, truncation="keep_end",
                                  cache_dir=tmp_path / "cache", progress=False)
    whole = lh.extract_features(loaded, PROMPTS, CANDIDATES, progress=False)
    kept = enc[1][0][len(enc[1][0]) - (limit - max(map(len, enc[1][1]))):]
    assert len(kept) + max(map(len, enc[1][1])) == limit and kept == enc[1][0][-len(kept):]
    with torch.inference_mode():
        expected = loaded.model.base_model(torch.tensor([kept], device=loaded.device)).last_hidden_state[0, -1]
    item1 = cut.entry_hidden[cut.entry_candidate == 2][0]             # first token of item 1's first answer
    np.testing.assert_allclose(cut.hidden[item1, :32], expected.float().cpu().numpy(), rtol=1e-5, atol=1e-5)
    first = whole.entry_hidden[whole.entry_candidate == 0]
    np.testing.assert_array_equal(cut.hidden[cut.entry_hidden[cut.entry_candidate == 0]], whole.hidden[first])
    np.testing.assert_array_equal(cut.entry_token, whole.entry_token)              # answers are never cut
    assert not np.allclose(cut.hidden[item1], whole.hidden[whole.entry_hidden[whole.entry_candidate == 2][0]])
    # the cut is part of the cache key: the untruncated features are not served from it
    again = lh.extract_features(loaded, PROMPTS, CANDIDATES, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again.hidden, whole.hidden)


def test_item7_context_length_sources(tokenizer):
    from types import SimpleNamespace

    from llm_head.extract import context_length
    assert tokenizer.model_max_length > 10 ** 20                   # SmolLM2's GGUF tokenizer: "unset"
    assert context_length(tiny_gemma(len(tokenizer), 77), tokenizer) == (77, "the model's config.max_position_embeddings")
    bare = SimpleNamespace(config=SimpleNamespace())
    assert context_length(bare, tokenizer) == (None, None)
    assert context_length(bare, SimpleNamespace(model_max_length=512)) == (512, "tokenizer.model_max_length")
    assert context_length(SimpleNamespace(config=SimpleNamespace(n_positions=64)), None)[0] == 64


def test_item7_batched_tokenisation_matches_one_by_one(tokenizer):
    from llm_head.extract import Rendering, encode_item, encode_items
    prompts = PROMPTS * 3 + ["Q: 2+2=", "x ⊕ y"]
    cands = CANDIDATES * 3 + [[" 4", "4", " four"], [" z"]]
    for rendering in (Rendering(), Rendering(add_eos=True), Rendering(chat_template=True)):
        assert encode_items(tokenizer, prompts, cands, rendering, chunk=3) == \
            [encode_item(tokenizer, p, c, rendering) for p, c in zip(prompts, cands)]


def test_item7_cli_max_length_and_truncation(tokenizer, tmp_path):
    from llm_head.__main__ import main as cli
    folder = tmp_path / "tiny"
    tiny_gemma(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(p, c[0], c[1], group=g)
                                                  for p, c, g in zip(PROMPTS * 2, CANDIDATES * 2, "abab")])
    args = ["extract", "--data", data, "--model", str(folder), "--device", DEVICE, "--dtype", "float32",
            "--workdir", str(tmp_path / "work"), "--max-length", "20"]
    with pytest.raises(SystemExit, match=r"llm_head extract: 2 of 2 items are longer than 20 tokens \(max_length=20\)"):
        cli(args)
    assert not os.path.exists(tmp_path / "work" / "features.safetensors")
    with pytest.warns(UserWarning, match="truncated the prompts of 2 of 2 items"):
        assert cli(args + ["--truncation", "keep_end"]) == 0
    with open(tmp_path / "work" / "dataset.json") as fh:
        assert json.load(fh)["truncation"] == {"max_length": 20, "mode": "keep_end"}


def test_item3_csv_empty_split_cell_is_no_split(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("prompt,chosen,rejected,group,split\nq1,a,b,g,train\nq2,a,b,g,\nq3,a,b,g,validation\n")
    pairs = lh.load_preference_pairs(str(path))
    assert pairs.table["split"].isna().tolist() == [False, True, False]
    assert pairs.table["split"][[0, 2]].tolist() == ["train", "val"]
    assert set(lh.assign_splits(pairs)) <= {"train", "val", "test"}
