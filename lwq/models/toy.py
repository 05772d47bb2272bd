"""Build the demo model on any machine, offline and deterministically.

A small Llama-architecture LM trained for a few minutes on CPU on the docstrings of the Python
standard library (text every Python install carries), with a byte-level BPE tokenizer trained on the
same text. Modules are split by a stable hash: 90% for training and calibration, 10% held out for
evaluation. The result is cached under ``$LWQ_CACHE`` (default ``~/.cache/lwq``).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

DEMO_VERSION = 1


@dataclass(frozen=True)
class DemoConfig:
    """Size and training schedule of the demo model."""

    version: int = DEMO_VERSION
    vocab: int = 1024
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    seqlen: int = 128
    batch: int = 16
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0


def cache_dir() -> Path:
    """``$LWQ_CACHE``, else ``$XDG_CACHE_HOME/lwq``, else ``~/.cache/lwq``."""
    if os.environ.get("LWQ_CACHE"):
        return Path(os.environ["LWQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lwq"


def stdlib_docstrings() -> tuple[str, str]:
    """(train text, held-out text): docstrings of stdlib modules, split 90/10 by a hash of the name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a stdlib file this Python cannot parse is simply not used
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if not text:
            continue
        bucket = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 10
        (held if bucket == 0 else train).append(text)
    return "\n\n".join(train), "\n\n".join(held)


def _train_tokenizer(text: str, vocab: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.save_pretrained(str(out))


def build_demo_model(out: Path, cfg: DemoConfig = DemoConfig(),
                     on_step: Callable[[int, int, float], None] | None = None) -> Path:
    """Train the demo model into ``out`` (model folder + ``calib.txt`` + ``eval.txt``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    train_text, held_text = stdlib_docstrings()
    out.mkdir(parents=True, exist_ok=True)
    (out / "calib.txt").write_text(train_text, encoding="utf-8")
    (out / "eval.txt").write_text(held_text, encoding="utf-8")
    model_dir = out / "model"
    _train_tokenizer(train_text, cfg.vocab, model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(train_text, return_tensors="pt").input_ids[0]
    mcfg = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4 * cfg.seqlen, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, ids.numel() - cfg.seqlen - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([ids[s:s + cfg.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, cfg.steps, float(loss.detach()))
    model.eval()
    model.save_pretrained(str(model_dir), safe_serialization=True)
    (out / "DEMO.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out


def demo_model(rebuild: bool = False, on_step: Callable[[int, int, float], None] | None = None) -> Path:
    """The cached demo model folder, built first if missing (or when ``rebuild``)."""
    cfg = DemoConfig()
    out = cache_dir() / f"demo-v{cfg.version}"
    stamp = out / "DEMO.json"
    if rebuild or not stamp.is_file() or json.loads(stamp.read_text()) != asdict(cfg):
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        build_demo_model(tmp, cfg, on_step)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out
