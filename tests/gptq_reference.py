"""An independent GPTQ (v1) reader for the export tests, written from the format's description only:
it imports nothing from lwq.

GPTQ v1, as AutoGPTQ / GPTQModel / vLLM read it:
- ``config.json`` ``quantization_config`` (or ``quantize_config.json``): ``bits``, ``group_size``,
  ``sym``, ``desc_act`` and ``dynamic``: ``{"+:regex": {overrides}, "-:regex": {}}``, matched with
  ``re.match`` against the full module name in key order; the first match wins, ``-:`` means the
  module is not quantized (it keeps a plain ``.weight``), a key without a prefix counts as ``+:``.
- ``<m>.qweight`` int32 [ceil(in*bits/32), out]: for every output column the input codes run as one
  little-endian bit stream through the 32-bit words (code ``i`` at stream bits ``i*bits .. +bits``).
- ``<m>.qzeros`` int32 [groups, ceil(out*bits/32)]: per group, the zero points of the output columns
  in the same bit stream, stored minus one: ``zero = (stored + 1) mod 2**bits`` (``checkpoint_format``
  ``gptq``); GPTQModel's ``gptq_v2`` stores them as they are.
- ``<m>.scales`` fp16 [groups, out]; ``<m>.g_idx`` int32 [in]: the group of each input column.
- ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file


def stream_values(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``words``: int32 [rows, nwords], each row one little-endian bit stream -> [rows, count] codes."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)  # little-endian bytes of each word
    stream = np.unpackbits(raw, axis=1, bitorder="little")  # bit j of the row's stream at column j
    assert stream.shape[1] >= count * bits, "too few words for the codes"
    fields = stream[:, : count * bits].reshape(words.shape[0], count, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(axis=2)


def module_rule(dynamic: dict, name: str) -> dict | None:
    """The overrides of the first dynamic key matching ``name``; None when a ``-:`` key matches it."""
    for key, overrides in dynamic.items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return None
            continue
        pattern = key[2:] if key.startswith("+:") else key
        if re.match(pattern, name):
            return dict(overrides)
    return {}


def dequantize_module(t: dict[str, np.ndarray], bits: int, v2: bool = False) -> np.ndarray:
    """The float32 weight (out, in) of one GPTQ module (v1, or ``v2``: zeros stored as they are)."""
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"].astype(np.float32), t["g_idx"]
    n_in, n_out = g_idx.shape[0], scales.shape[1]
    q = stream_values(qweight.T, bits, n_in)  # [out, in]
    zeros = (stream_values(qzeros, bits, n_out) + (0 if v2 else 1)) % (1 << bits)  # [groups, out]
    g = g_idx.astype(np.int64)
    return scales[g].T * (q - zeros[g].T).astype(np.float32)


def read_gptq(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, int]]:
    """(config without quantization_config, the dequantized float32 state dict, bits per quantized module)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config")
    fmt = qc.get("checkpoint_format", "gptq")
    assert qc["quant_method"] == "gptq" and fmt in ("gptq", "gptq_v2") and qc.get("format", fmt) == fmt
    side = json.loads((folder / "quantize_config.json").read_text())
    assert all(side[k] == qc[k] for k in ("bits", "group_size", "sym", "desc_act", "dynamic"))
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw.update(load_file(str(folder / f)))
    modules = sorted({k[: -len(".qweight")] for k in raw if k.endswith(".qweight")})
    state: dict[str, torch.Tensor] = {}
    bits_of: dict[str, int] = {}
    for m in modules:
        rule = module_rule(qc.get("dynamic") or {}, m)
        assert rule is not None, f"{m} holds qweight but a -: dynamic key skips it"
        bits, group = rule.get("bits", qc["bits"]), rule.get("group_size", qc["group_size"])
        t = {s: raw.pop(f"{m}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        n_in = t["g_idx"].shape[0]
        assert t["qweight"].shape[0] == -(-n_in * bits // 32), f"{m}: qweight rows do not fit {bits} bits"
        assert t["scales"].shape[0] == (1 if group == -1 else -(-n_in // group)), f"{m}: groups do not fit g{group}"
        state[f"{m}.weight"] = torch.from_numpy(dequantize_module(t, bits, fmt == "gptq_v2"))
        bits_of[m] = bits
    for k, v in raw.items():
        if k.endswith(".weight") and k[: -len(".weight")] not in modules:
            mod = k[: -len(".weight")]
            if module_rule(qc.get("dynamic") or {}, mod) is None:
                bits_of[mod] = 16
        state[k] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    return config, state, bits_of


def load_gptq_model(folder: str | Path):
    """A transformers model (float32, eval) holding the dequantized weights of a GPTQ export."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state, _ = read_gptq(folder)
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(cfg, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    assert not unexpected and set(missing) == tied, (missing, unexpected)
    model.tie_weights()
    return model.eval()
