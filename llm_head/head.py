"""The output layer as θ: read the reference rows W₀[V′], write tuned rows back, export.

The trained object is the *candidate-set* policy :math:`\\pi_W(y|x)\\propto\\exp f_W(x,y)` over
Y(x). For single-token candidates it equals the exported model's next-token distribution
renormalised over the candidates (tested). For multi-token candidates the full model normalises
every position over the whole vocabulary, so its sequence probabilities differ from the
candidate-set policy by per-position normalisers; the tuned rows are still exactly θ.
"""
from __future__ import annotations

import json
import os

import numpy as np

from loglinear_grpo._io import make_readable


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output layer")
    return head


def head_rows(model, vocab):
    """W₀ rows of the tokens ``vocab`` (|V′|, d), float64, with the bias appended when there is one."""
    import torch
    head = _head(model)
    idx = torch.as_tensor(np.asarray(vocab), dtype=torch.long, device=head.weight.device)
    rows = head.weight.detach()[idx].double().cpu().numpy()
    bias = getattr(head, "bias", None)
    if bias is not None:
        rows = np.hstack([rows, bias.detach()[idx].double().cpu().numpy()[:, None]])
    return rows


def reference_theta(model, features):
    """θ_ref: the frozen model's own output rows for V′, flattened as :class:`LastLayerFeatures` expects."""
    return features.theta_from_rows(head_rows(model, features.vocab))


def is_tied(model):
    head, emb = _head(model), model.get_input_embeddings()
    return emb is not None and head.weight.data_ptr() == emb.weight.data_ptr()


def untie_output_layer(model):
    """Give the output layer its own copy of the weights (Gemma and SmolLM2 tie them to the input embeddings)."""
    import torch
    head = _head(model)
    if is_tied(model):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False
    return model


def write_rows(model, vocab, rows):
    """Write ``rows`` (|V′|, d[+1]) into the (untied) output layer of ``model`` in place."""
    import torch
    untie_output_layer(model)
    head = _head(model)
    d = head.weight.shape[1]
    rows = np.asarray(rows)
    with torch.no_grad():
        idx = torch.as_tensor(np.asarray(vocab), dtype=torch.long, device=head.weight.device)
        head.weight[idx] = torch.as_tensor(rows[:, :d], dtype=head.weight.dtype, device=head.weight.device)
        if getattr(head, "bias", None) is not None:
            head.bias[idx] = torch.as_tensor(rows[:, d], dtype=head.bias.dtype, device=head.bias.device)
    return model


def save_head_delta(path, vocab, rows, reference_rows=None, model_spec=None):
    """A small file with the tuned rows (and the reference rows, to check the base model on load)."""
    from safetensors.numpy import save_file
    tensors = {"vocab": np.asarray(vocab, dtype=np.int64), "rows": np.asarray(rows, dtype=np.float32)}
    if reference_rows is not None:
        tensors["reference_rows"] = np.asarray(reference_rows, dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, os.fspath(path), metadata={"model": json.dumps(model_spec or {})})
    make_readable(os.fspath(path))


def load_head_delta(model, path, atol=1e-3):
    """Apply a head-delta file to ``model`` (untying its output layer); checks the reference rows."""
    from safetensors.numpy import load_file
    tensors = load_file(os.fspath(path))
    if "reference_rows" in tensors:
        current = head_rows(model, tensors["vocab"])
        if current.shape != tensors["reference_rows"].shape or \
                not np.allclose(current, tensors["reference_rows"], atol=atol):
            raise ValueError(f"{path} was trained on another base model (its reference rows differ)")
    return write_rows(model, tensors["vocab"], tensors["rows"])


def _dequantized(model):
    """A model loaded from GGUF holds de-quantised tensors already, but transformers still marks it as
    GGUF-quantised and refuses ``save_pretrained``; drop the marks so that it saves as a plain model
    (``from_pretrained`` then reloads it without the ``gguf`` package)."""
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) in ("gguf", "GGUF") or \
            type(getattr(model, "hf_quantizer", None)).__name__ == "GgufHfQuantizer":
        model.hf_quantizer = None
        model.is_quantized = False
        for attr in ("quantization_config", "_is_quantized"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
    return model


def export_delta(features, theta, out_dir, theta_ref=None, model_spec=None):
    """Write ``head_delta.safetensors`` only: the token ids, the tuned rows θ and the reference rows
    θ_ref (all from the work folder), so no model is loaded (``export --delta-only``)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "head_delta.safetensors")
    ref_rows = None if theta_ref is None else features.rows_from_theta(theta_ref)
    save_head_delta(path, features.vocab, features.rows_from_theta(theta), ref_rows, model_spec)
    return out_dir


def export_model(model, tokenizer, features, theta, out_dir, theta_ref=None, model_spec=None,
                 save_full=True):
    """Write θ into a copy of the output layer and save: ``head_delta.safetensors`` always, and the
    whole model + tokenizer with ``save_pretrained`` when ``save_full``."""
    import copy
    export_delta(features, theta, out_dir, theta_ref, model_spec)
    rows = features.rows_from_theta(theta)
    if save_full:
        tuned = _dequantized(write_rows(copy.deepcopy(model), features.vocab, rows))
        tuned.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    for name in os.listdir(out_dir):
        if os.path.isfile(os.path.join(out_dir, name)):
            make_readable(os.path.join(out_dir, name))
    return out_dir
