"""Issue 22, "What a new user hit" (llm_head extraction and export): a progress bar that moves with
each batch and a shard size chosen by device; refusals before the model loads; ``export --delta-only``
without the model; one line instead of the GGUF de-quantisation bars."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llm_head as lh  # noqa: E402
from llm_head import extract as ex  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402

from test_llm_data import _extract, _trained_run, shared_pairs  # noqa: E402,F401  (shared_pairs: a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")




@pytest.fixture(scope="module")
def loaded(gemma_folder):
    return lh.load_model(gemma_folder, device="cpu", dtype=torch.float32)


# ============================================================================ 1. progress and shard size
class _Bar:
    """Stands in for tqdm: records each update in the shared event log."""

    events = []

    def __init__(self, *args, total=None, **kwargs):
        self.total = total

    def update(self, n=1):
        _Bar.events.append(("update", n))

    def close(self):
        pass


def test_progress_bar_advances_with_each_batch_before_the_first_shard_is_written(loaded, monkeypatch, tmp_path):
    import tqdm.auto
    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    _Bar.events = []
    write_shard = ex.FeatureCache.write_shard

    def logged_write(self, j, arrays):
        _Bar.events.append(("shard", j))
        return write_shard(self, j, arrays)

    monkeypatch.setattr(ex.FeatureCache, "write_shard", logged_write)
    prompts = [f"Question {i}: is {i} a lucky number? Answer:" for i in range(40)]
    candidates = [[" yes", " no"] for _ in prompts]
    ex.extract_features(loaded, prompts, candidates, cache_dir=tmp_path / "cache", batch_size=4,
                        shard_items=40, progress=True)
    first_shard = _Bar.events.index(("shard", 0))
    before = [n for kind, n in _Bar.events[:first_shard] if kind == "update"]
    assert len(before) >= 5 and 0 < before[0] < 40               # moves batch by batch within the shard
    assert sum(n for kind, n in _Bar.events if kind == "update") == 40


def test_shard_size_is_chosen_by_device_and_a_cpu_run_resumes(loaded, monkeypatch, tmp_path):
    assert ex.default_shard_items("cuda") == ex.DEFAULT_SHARD_ITEMS == 2048   # the GPU default is kept
    assert ex.default_shard_items("cuda:1") == 2048
    assert ex.default_shard_items("cpu") == ex.CPU_SHARD_ITEMS < 2048
    prompts = [f"Item {i} is" for i in range(ex.CPU_SHARD_ITEMS + 5)]
    candidates = [[" a", " b"] for _ in prompts]
    first = ex.extract_features(loaded, prompts, candidates, cache_dir=tmp_path, batch_size=64, progress=False)
    (folder,) = [d for d in os.listdir(tmp_path)]
    with open(tmp_path / folder / "meta.json") as fh:
        assert json.load(fh)["key"]["shard_items"] == ex.CPU_SHARD_ITEMS
    assert sorted(f for f in os.listdir(tmp_path / folder) if f.endswith(".safetensors")) == \
        ["shard-00000.safetensors", "shard-00001.safetensors"]
    os.remove(tmp_path / folder / "shard-00001.safetensors")        # interrupted after the first shard
    computed = []
    features_for_items = ex._features_for_items
    monkeypatch.setattr(ex, "_features_for_items",
                        lambda *a, **k: computed.append(len(a[1].sequences)) or features_for_items(*a, **k))
    again = ex.extract_features(loaded, prompts, candidates, cache_dir=tmp_path, batch_size=64, progress=False)
    assert len(computed) == 1                                       # resumed: only the missing shard
    np.testing.assert_array_equal(first.hidden, again.hidden)


# ============================================================================ 2. refusals before the model loads
def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded (it must not be, here)")


def test_extract_into_a_folder_with_runs_is_refused_before_the_model_loads(tmp_path, shared_pairs, gemma_folder,
                                                                           monkeypatch):
    data, work = _trained_run(tmp_path, shared_pairs, gemma_folder)
    other = tmp_path / "other.jsonl"
    shared_pairs.iloc[:20].to_json(other, orient="records", lines=True)
    load_model = ex.load_model
    monkeypatch.setattr(ex, "load_model", _no_model)
    with pytest.raises(SystemExit, match="1 run.* trained on other features .another model or data"):
        _extract(other, work, gemma_folder)                               # other data
    with pytest.raises(SystemExit, match="trained on other features .another model"):
        _extract(data, work, gemma_folder, "--dtype", "bfloat16")         # another dtype
    monkeypatch.setattr(ex, "load_model", load_model)
    assert _extract(data, work, gemma_folder) == 0                        # the same extraction again: allowed
    assert _extract(other, work, gemma_folder, "--force") == 0            # --force still works


def test_a_mistyped_split_by_column_is_refused_before_the_model_loads(tmp_path, shared_pairs, gemma_folder,
                                                                      monkeypatch):
    data = tmp_path / "pairs.jsonl"
    shared_pairs.to_json(data, orient="records", lines=True)
    monkeypatch.setattr(ex, "load_model", _no_model)
    with pytest.raises(SystemExit, match=r"--split-by 'questionid': no such column.*'question_id'"):
        _extract(data, tmp_path / "work", gemma_folder, "--split-by", "questionid")
    assert not os.path.exists(tmp_path / "work" / "features.safetensors")


# ============================================================================ 3. export --delta-only; GGUF bars
def test_export_delta_only_loads_no_model_and_writes_the_same_delta(tmp_path, shared_pairs, gemma_folder,
                                                                     monkeypatch):
    from safetensors.numpy import load_file
    data, work = _trained_run(tmp_path, shared_pairs, gemma_folder)
    assert cli(["export", "--workdir", str(work), "--run", "r", "--out", str(tmp_path / "full")]) == 0
    monkeypatch.setattr(ex, "load_model", _no_model)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_model)
    assert cli(["export", "--workdir", str(work), "--run", "r", "--delta-only"]) == 0
    delta = work / "runs" / "r" / "model"
    assert os.listdir(delta) == ["head_delta.safetensors"]
    fast, full = load_file(delta / "head_delta.safetensors"), load_file(tmp_path / "full" / "head_delta.safetensors")
    assert sorted(fast) == sorted(full) == ["reference_rows", "rows", "vocab"]
    for k in fast:
        np.testing.assert_array_equal(fast[k], full[k])


def test_a_gguf_load_prints_one_line_instead_of_per_tensor_bars(gemma_folder, monkeypatch, capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    seen = {}
    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, \
        transformers.AutoTokenizer.from_pretrained

    def model_from_pretrained(name, gguf_file=None, **kwargs):
        seen["hf_bars"] = hf_logging.is_progress_bar_enabled()
        seen["gguf_bar_disabled"] = gguf_utils.tqdm([1], desc="probe").disable
        return real_model(gemma_folder, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, gguf_file=None, **kw: real_tokenizer(gemma_folder, **kw))
    bars_before = hf_logging.is_progress_bar_enabled()
    lh.load_model(gemma_folder, gguf_file="tiny.gguf", device="cpu", dtype=torch.float32)
    assert seen == {"hf_bars": False, "gguf_bar_disabled": True}          # no per-tensor bars during the load
    assert hf_logging.is_progress_bar_enabled() == bars_before          # restored afterwards
    assert not getattr(gguf_utils.tqdm([1], desc="probe"), "disable", False)
    out = capsys.readouterr().out
    assert out.count("de-quantising tiny.gguf") == 1
