"""Resumable quantization: progress is recorded block by block in a work folder beside the output.

``OUT.partial/`` holds

- ``state.json``: the run's fingerprint and ``next_block``; written last for each block, atomically
  (temporary file + rename), so it is the commit point: whatever it names is complete on disk;
- ``block-NNNNN.safetensors``: every tensor of finished block ``NNNNN`` (its ``QuantizedLinear``s,
  norms, unplanned linears), their state-dict order in the file's metadata;
- ``inputs-NNNNN.safetensors``: the hidden states entering block ``NNNNN`` (one tensor per
  calibration batch) and the RNG state, for plans that need calibration data. The other block
  arguments (masks, position embeddings) are recomputed by capturing block 0's inputs again;
- ``plan.json``: for budgeted runs, the plan, so the slow planning is not redone.

The final checkpoint streams the blocks' tensors from these files (``stream_state``), so a run
resumed after a kill writes exactly the bytes of an uninterrupted one and memory does not hold every
quantized block. The folder is removed once the checkpoint is in place.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lwq.spec import __version__
from lwq.errors import BadInput
from lwq.fileio import write_atomic, write_error, write_json_atomic
from lwq.formats.checkpoint import unique_state
from lwq.formats.folder import TensorRef
from lwq.formats.qlinear import QuantizedLinear, replace_linear
from lwq.models.arch import arch_for, block_index, get_blocks, linear_shape
from lwq.models.blocks import BlockInputs, capture_block_inputs, move_outside_blocks
from lwq.pipeline.blockwise import BATCH_SIZE, plan_needs_data
from lwq.spec import LayerSpec

STATE = "state.json"
PLAN = "plan.json"


def work_dir(out: str | Path) -> Path:
    """The work folder of output ``out``: ``OUT.partial`` beside it."""
    p = Path(out).expanduser().resolve()
    return p.parent / f"{p.name}.partial"


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plan_digest(plan: dict[str, LayerSpec]) -> str:
    return digest([[name, spec.to_dict()] for name, spec in plan.items()])


def tensor_digest(t: torch.Tensor | None) -> str | None:
    """sha256 of a tensor's bytes (the calibration token ids): catches any change of data or tokenizer."""
    if t is None:
        return None
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def model_identity(name: str) -> dict[str, Any]:
    """What identifies the source model: its resolved folder, the sha256 of its config and of every
    weight file (by content: a same-size rewrite of the weights is a different model; one read pass,
    memoised per file, size and mtime), or the hub id."""
    p = Path(name).expanduser()
    if not p.is_dir():
        return {"id": name}
    cfg = p / "config.json"
    return {"path": str(p.resolve()),
            "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None,
            "weights": [[f.name, f.stat().st_size, file_digest(str(f.resolve()), f.stat().st_size,
                                                               f.stat().st_mtime_ns)]
                        for f in sorted(p.glob("*.safetensors"))]}


@functools.lru_cache(maxsize=64)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (``size``/``mtime_ns`` key the memo: a rewritten file is hashed again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(**fields: Any) -> dict[str, Any]:
    """A run's fingerprint: the given fields plus the lwq version, as JSON reads them back (tuples
    become lists) so a recorded one compares equal."""
    return json.loads(json.dumps({"lwq_version": __version__, **fields}, default=str))


@dataclass
class WorkFolder:
    """The work folder of one output; ``next_block`` is the first block still to quantize."""

    path: Path
    next_block: int = 0
    fingerprint: dict[str, Any] | None = None

    @classmethod
    def claim(cls, out: str | Path, resume: bool, force: bool) -> "WorkFolder":
        """Open the work folder of ``out``: continue it with ``resume``, discard it with ``force``,
        refuse it otherwise. A folder holding no finished block and no plan is simply discarded;
        the folder itself is created when the run starts (``start``/``save_plan``)."""
        path = work_dir(out)
        if path.exists() and not path.is_dir():
            raise BadInput(f"{path} is a file; the work folder of {out} must be a folder")
        work = cls(path)
        state = work._read_state() if path.is_dir() and (resume or not force) else None
        if state is not None:
            work.next_block, work.fingerprint = int(state["next_block"]), state["fingerprint"]
        worth_keeping = work.next_block > 0 or (path / PLAN).is_file()
        if path.exists() and not (resume and worth_keeping):
            if worth_keeping and not force:
                raise BadInput(f"{path} holds an unfinished run for {out}: pass --resume to continue it "
                               "or --force to start over")
            shutil.rmtree(path)
            work = cls(path)
        return work

    def _mkdir(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def _read_state(self) -> dict[str, Any] | None:
        f = self.path / STATE
        if not f.is_file():
            return None
        try:
            state = json.loads(f.read_text())
            int(state["next_block"]), dict(state["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"{f} is damaged ({type(exc).__name__}); pass --force to start over") from None
        return state

    def start(self, fp: dict[str, Any]) -> int:
        """Check ``fp`` against the recorded run (a mismatch is a ``BadInput``) or record it; returns
        the block to start from."""
        if self.fingerprint is not None and self.fingerprint != fp:
            diff = sorted(k for k in set(fp) | set(self.fingerprint) if fp.get(k) != self.fingerprint.get(k))
            raise BadInput(f"{self.path} belongs to a different run ({', '.join(diff)} changed); rerun it with "
                           "the same arguments, or pass --force to start over")
        self.fingerprint = fp
        self._mkdir()
        if not (self.path / STATE).is_file():
            write_json_atomic(self.path / STATE, {"fingerprint": fp, "next_block": self.next_block})
        return self.next_block

    def block_file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        return self.path / f"inputs-{i:05d}.safetensors"

    def save_block(self, i: int, block: nn.Module, prefix: str, next_hidden: list[torch.Tensor] | None,
                   reference: list[torch.Tensor] | None = None) -> None:
        """Record finished block ``i`` (its tensors, and the inputs of block ``i + 1`` when given, with
        the full-precision stream when refining), then commit ``next_block = i + 1``."""
        state = {f"{prefix}.{k}": t.detach().cpu().contiguous() for k, t in unique_state(block).items()}
        write_atomic(self.block_file(i), lambda p: save_file(state, str(p), metadata={"keys": json.dumps(list(state))}))
        if next_hidden is not None:
            tensors = {f"hidden.{j}": h.detach().cpu().contiguous() for j, h in enumerate(next_hidden)}
            tensors.update({f"reference.{j}": h.detach().cpu().contiguous() for j, h in enumerate(reference or [])})
            tensors["rng.cpu"] = torch.get_rng_state()
            if torch.cuda.is_available():
                tensors["rng.cuda"] = torch.cuda.get_rng_state()
            write_atomic(self.inputs_file(i + 1), lambda p: save_file(tensors, str(p)))
        self.next_block = i + 1
        write_json_atomic(self.path / STATE, {"fingerprint": self.fingerprint, "next_block": self.next_block})
        self.inputs_file(i).unlink(missing_ok=True)

    def load_inputs(self, i: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The saved hidden states entering block ``i`` and the saved full-precision stream (None
        when none was saved), and restore the RNG state saved with them."""
        f = self.inputs_file(i)
        if not f.is_file():
            raise BadInput(f"{self.path} lacks the inputs of block {i}; pass --force to start over")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                keys = set(st.keys())
                count = sum(k.startswith("hidden.") for k in keys)
                hidden = [st.get_tensor(f"hidden.{j}").to(device) for j in range(count)]
                refs = sum(k.startswith("reference.") for k in keys)
                reference = [st.get_tensor(f"reference.{j}").to(device) for j in range(refs)] if refs else None
                torch.set_rng_state(st.get_tensor("rng.cpu"))
                if "rng.cuda" in keys and torch.cuda.is_available():
                    torch.cuda.set_rng_state(st.get_tensor("rng.cuda"))
        except (SafetensorError, OSError) as exc:
            raise damaged(f, exc) from None
        return hidden, reference

    def block_refs(self, i: int) -> dict[str, TensorRef]:
        """Block ``i``'s tensors in state-dict order, each read from the file when needed."""
        f = self.block_file(i)
        if not f.is_file():
            raise BadInput(f"{self.path} lacks block {i}; pass --force to start over")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                keys = json.loads((st.metadata() or {}).get("keys", "[]"))
                if sorted(keys) != sorted(st.keys()):
                    raise BadInput(f"{f} is damaged; pass --force to start over")
                shapes = {k: (st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape())) for k in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise damaged(f, exc) from None
        return {k: TensorRef(_DTYPES[dt], shape, _reader(f, k)) for k, (dt, shape) in shapes.items()}

    def save_plan(self, planning: dict[str, Any], plan: dict[str, Any]) -> None:
        self._mkdir()
        write_json_atomic(self.path / PLAN, {"fingerprint": planning, "plan": plan})

    def saved_plan(self, planning: dict[str, Any]) -> dict[str, Any] | None:
        """The plan saved by an earlier attempt of the same planning, if any."""
        f = self.path / PLAN
        if not f.is_file():
            return None
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise BadInput(f"{f} is damaged ({type(exc).__name__}); pass --force to start over") from None
        if not isinstance(doc, dict) or doc.get("fingerprint") != planning:
            raise BadInput(f"{f} was planned with other arguments; rerun with the same ones, or pass --force")
        return doc.get("plan")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def discard_if_empty(self) -> None:
        """Remove the folder when it holds nothing worth resuming (no finished block, no plan)."""
        if self.next_block == 0 and not (self.path / PLAN).is_file():
            self.remove()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


def damaged(f: Path, exc: BaseException) -> BadInput:
    """The one line for a work-folder file that cannot be read back."""
    why = " ".join(str(exc).split())[:120] or type(exc).__name__
    return BadInput(f"{f} is damaged ({why}); pass --force to start over")


def _reader(f: Path, key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            return st.get_tensor(key).clone()
    return read


def stream_state(model: nn.Module, work: WorkFolder) -> dict[str, TensorRef]:
    """The checkpoint's tensors in order: the finished blocks' from the work folder, the rest
    (embeddings, final norm, head) from ``model``."""
    prefix = arch_for(model).blocks
    out: dict[str, TensorRef] = {}
    emitted: set[int] = set()
    for key, t in unique_state(model).items():
        b = block_index(key, prefix)
        if b is None:
            out[key] = TensorRef.of(t)
        elif b < work.next_block:
            if b not in emitted:
                out.update(work.block_refs(b))
                emitted.add(b)
        else:
            raise BadInput(f"block {b} is not quantized yet; cannot write the checkpoint")
    return out


def restore_blocks(model: nn.Module, work: WorkFolder, plan: dict[str, LayerSpec], load: bool) -> None:
    """Put the finished blocks of ``work`` back into ``model``: their planned linears become
    ``QuantizedLinear``s holding the saved tensors (``load``) or empty ``meta`` ones of the same
    shapes (a lazily loaded model, whose blocks stay on disk); with ``load`` the other tensors of
    those blocks are loaded too."""
    prefix = arch_for(model).blocks
    blocks = get_blocks(model)
    for i in range(work.next_block):
        refs = work.block_refs(i)
        block = blocks[i]

        def get(k: str) -> torch.Tensor:
            r = refs[k]
            return r.read() if load else torch.empty(r.shape, dtype=r.dtype, device="meta")

        planned = [n for n in plan if block_index(n, prefix) == i]
        for name in planned:
            rel = name[len(f"{prefix}.{i}."):]
            keys = [k for k in refs if k.startswith(name + ".")]
            tensors = {k[len(name) + 1:]: get(k) for k in keys if k != f"{name}.bias"}
            bias = get(f"{name}.bias") if f"{name}.bias" in refs else None
            out_f, in_f = linear_shape(block.get_submodule(rel))
            replace_linear(block, rel, QuantizedLinear(plan[name], out_f, in_f, tensors, bias))
        if load:
            rest = {k[len(f"{prefix}.{i}."):]: refs[k].read() for k in refs
                    if not any(k.startswith(n + ".") for n in planned)}
            missing, unexpected = block.load_state_dict(rest, strict=False)
            if unexpected:
                raise BadInput(f"{work.block_file(i)} holds tensors the model lacks, e.g. {unexpected[0]}")


def resume_inputs(model: nn.Module, work: WorkFolder, plan: dict[str, LayerSpec], batches: torch.Tensor | None,
                  device: torch.device, load: bool, refining: bool = False) -> BlockInputs | None:
    """Put the finished blocks back into ``model`` (``restore_blocks``) and rebuild the inputs of the
    next block: the saved hidden states, with the other block arguments (masks, position
    embeddings) recomputed by capturing block 0's inputs again; None when the rest needs no data."""
    restore_blocks(model, work, plan, load)
    arch = arch_for(model)
    rest = {n: s for n, s in plan.items() if (block_index(n, arch.blocks) or 0) >= work.next_block}
    if batches is None or not (refining or plan_needs_data(rest)):
        return None
    hidden, reference = work.load_inputs(work.next_block, device)
    if refining and (reference is None or len(reference) != len(hidden)):
        raise BadInput(f"{work.path} lacks the full-precision states refinement needs; pass --force to start over")
    home = next(model.parameters()).device
    captured = capture_block_inputs(model, batches.split(BATCH_SIZE), device, arch)
    move_outside_blocks(model, arch, home)
    if len(captured.hidden) != len(hidden):
        raise BadInput(f"{work.path} holds {len(hidden)} batches of inputs, this run has {len(captured.hidden)}; "
                       "pass --force to start over")
    return captured.with_hidden(hidden, reference if refining else None)


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Run with torch's deterministic algorithms (restored after). On CUDA, cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG`` (set here unless the user set it) before its first handle; ops with
    no deterministic implementation warn once instead of failing. On CPU this changes nothing."""
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
