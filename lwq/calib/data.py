"""Text sources (named ``datasets`` corpora or local files) and tokenization into samples."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lwq.errors import BadInput, LwqError


@dataclass(frozen=True)
class NamedSource:
    """A corpus on the Hugging Face hub: dataset path, config, split per use, text field."""

    path: str
    config: str | None
    splits: dict[str, str]
    field: str = "text"
    join: str = "\n\n"
    data_files: dict[str, str] | None = None


NAMED_SOURCES: dict[str, NamedSource] = {
    "wikitext2": NamedSource("wikitext", "wikitext-2-raw-v1", {"eval": "test", "calib": "train"}),
    "wikitext103": NamedSource("wikitext", "wikitext-103-raw-v1", {"eval": "test", "calib": "train"}),
    "ptb": NamedSource("ptb_text_only", "penn_treebank", {"eval": "test", "calib": "train"}, field="sentence",
                       join=" "),
    "c4": NamedSource(
        "allenai/c4", None, {"eval": "validation", "calib": "train"}, join=" ",
        data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read text file {path}: {exc}") from None


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise BadInput(f"{path}:{lineno}: no string field {field!r}")
        texts.append(row[field])
    return "\n\n".join(texts)


def load_text(source: str, use: str = "eval", text_field: str = "text") -> str:
    """The text of ``source``: a ``.txt``/``.jsonl`` file, a folder of ``.txt`` files, or a named
    corpus (``wikitext2``, ``c4``, ``ptb``) through ``datasets``. ``use`` picks the split of a named
    corpus: ``eval`` (test/validation) or ``calib`` (train)."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise BadInput(f"no .txt files in folder {source}")
        text = "\n\n".join(_read(f) for f in files)
    elif p.is_file():
        text = _read_jsonl(p, text_field) if p.suffix in (".jsonl", ".json") else _read(p)
    elif source in NAMED_SOURCES:
        text = _load_named(NAMED_SOURCES[source], use)
    else:
        raise BadInput(f"no such text source {source!r}: not a file or folder, nor one of "
                       f"{', '.join(NAMED_SOURCES)}")
    if not text.strip():
        raise BadInput(f"text source {source} is empty")
    return text


def _load_named(src: NamedSource, use: str, loader: Callable[..., Any] | None = None) -> str:
    """Load a named corpus split through ``datasets`` (reached over the network by real users)."""
    if loader is None:
        try:
            from datasets import load_dataset as loader
        except ImportError:
            raise LwqError("the datasets package is needed for named corpora: pip install datasets") from None
    split = src.splits[use]
    try:
        kwargs: dict[str, Any] = {"split": split}
        if src.data_files:
            kwargs["data_files"] = {split: src.data_files[split]}
        ds = loader(src.path, src.config, **kwargs)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise LwqError(f"cannot load dataset {src.path} ({split}): {' '.join(str(exc).split())[:200]}; "
                       "offline? pass a local .txt/.jsonl file instead") from None
    return src.join.join(str(t) for t in ds[src.field])


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the whole text, tokenized once (special tokens only as the tokenizer adds them)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids[0].to(torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (GPTQ-style calibration), reproducible by seed.

    Returns ``(nsamples, seqlen)``. Fewer tokens than one window is an error."""
    if nsamples <= 0:
        raise BadInput(f"nsamples must be positive, got {nsamples}")
    if seqlen <= 1:
        raise BadInput(f"seqlen must be at least 2, got {seqlen}")
    n = ids.numel()
    if n < seqlen:
        raise BadInput(f"the text has {n} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def calibration_samples(tokenizer: Any, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        text_field: str = "text") -> torch.Tensor:
    """Tokenized calibration windows from ``source`` (its calibration split if named)."""
    return sample_windows(tokenize(tokenizer, load_text(source, "calib", text_field)), nsamples, seqlen, seed)


SELF_DATA = "self"


@torch.no_grad()
def self_generated_samples(model: Any, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """``nsamples`` sequences of ``seqlen`` tokens sampled from ``model`` itself (temperature 1, no
    truncation), starting from its BOS token (else a random token): calibration text that needs no
    data set, as in data-free quantization. Reproducible by ``seed`` on a given device."""
    if nsamples <= 0:
        raise BadInput(f"nsamples must be positive, got {nsamples}")
    if seqlen <= 1:
        raise BadInput(f"seqlen must be at least 2, got {seqlen}")
    cfg = model.config
    vocab = int(model.get_output_embeddings().weight.shape[0])
    bos = getattr(cfg, "bos_token_id", None)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    for start in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - start)
        first = (torch.full((n, 1), int(bos)) if isinstance(bos, int) and 0 <= bos < vocab
                 else torch.randint(0, vocab, (n, 1), generator=gen)).to(device)
        ids = model.generate(input_ids=first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                             pad_token_id=0 if getattr(cfg, "pad_token_id", None) is None else cfg.pad_token_id)
        out.append(ids[:, :seqlen].cpu())
    return torch.cat(out).to(torch.long)
