"""The measured-error database, on one device or spread over several.

Measuring a candidate = quantizing one linear alone at one spec and recording the next-token KL
divergence to the full model (``lwq.score.sensitivity.SensitivityProbe``). The work is cut into
tasks of one spec and one block's linears; a trial in block ``i`` runs blocks ``i..N-1``, so tasks
are handed out largest first. ``measure_local`` runs them in this process; ``measure_parallel``
starts one worker process per device (``spawn``), each with its own copy of the model placed on
its device (``lwq.models.placement``: whole when it fits, else read from the model's files one block
per turn), pulling tasks from a shared queue. Results do not depend on how tasks were spread: every
task measures against the same cached reference on the same samples.
"""
from __future__ import annotations

import os
import queue
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from lwq.errors import BadInput, LwqError
from lwq.spec import LayerSpec

Progress = Callable[[int, int], None]
Entries = dict[str, dict[str, float]]
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class MeasureTask:
    """Measure ``names`` (linears of block ``block``) each quantized alone at ``spec``."""

    spec: LayerSpec
    block: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads its own copy of the model."""

    name: str
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_memory: int | None = None  # see ``lwq.models.placement.place``


def make_tasks(todo: Mapping[LayerSpec, Sequence[str]], block_of: Callable[[str], int],
               nblocks: int) -> list[MeasureTask]:
    """Tasks of one spec and one block's linears, most expensive (earliest block, most linears) first."""
    tasks = []
    for spec, names in todo.items():
        by_block: dict[int, list[str]] = {}
        for n in names:
            by_block.setdefault(block_of(n), []).append(n)
        tasks.extend(MeasureTask(spec, b, tuple(ns)) for b, ns in by_block.items())
    return sorted(tasks, key=lambda t: -(nblocks - t.block) * len(t.names))


def run_task(probe: Any, task: MeasureTask, follow_backend: bool = False) -> dict[str, float]:
    """The KL of every linear of ``task`` (clamped at 0: tiny negative values are float noise);
    ``follow_backend``: quantize trials with ``backend_quantizer`` instead of round-to-nearest."""
    sp = task.spec
    from lwq.score.trials import backend_quantizer

    quantizer = backend_quantizer(sp) if follow_backend else None
    kl = probe.measure(list(task.names), "linear", bits=sp.bits, group_size=sp.group_size, sym=sp.sym,
                       quantizer=quantizer)
    return {n: max(float(v), 0.0) for n, v in kl.items()}


def measure_local(model: torch.nn.Module, samples: torch.Tensor, tasks: Sequence[MeasureTask],
                  on_step: Progress | None = None, placement: Any = None, follow_backend: bool = False) -> Entries:
    """Run ``tasks`` on ``model`` in this process, where ``placement`` (``lwq.models.placement``) says
    (default: where the model is); returns name -> spec key -> KL."""
    from lwq.allocate.candidates import spec_key
    from lwq.score.sensitivity import SensitivityProbe

    entries: Entries = {}
    if not tasks:
        return entries
    probe = SensitivityProbe(model, samples, device=placement.device if placement else None,
                             loader=placement.loader if placement else None)
    for k, task in enumerate(tasks):
        for name, v in run_task(probe, task, follow_backend).items():
            entries.setdefault(name, {})[spec_key(task.spec)] = v
        if on_step is not None:
            on_step(k + 1, len(tasks))
    return entries


def parse_devices(text: str | None) -> list[str]:
    """``cuda:0,cuda:1`` / ``all`` (every visible GPU) / ``cpu,cpu`` -> device names, each checked."""
    from lwq.models.load import resolve_device

    if text is None or not text.strip():
        return []
    if text.strip() == "all":
        if not torch.cuda.is_available():
            raise BadInput("--devices all asked for GPUs but no CUDA GPU is available")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    out = []
    for part in text.split(","):
        try:
            dev = resolve_device(part.strip())
        except BadInput as exc:
            raise BadInput(f"--devices: {exc}") from None
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"--devices: {part.strip()} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        out.append(str(dev))
    return out


def _worker(source: ModelSource, device: str, threads: int, make_runner: Callable[..., Callable[[Any], Any]],
            args: tuple[Any, ...], tasks: Any, results: Any) -> None:
    """A worker process: load the model on ``device``, build ``make_runner(model, placement, *args)``
    and run it on tasks until a ``None`` arrives. Sends ``("ok", task index, result)`` per task, or
    ``("error", device, message, exit code, traceback)``."""
    try:
        torch.set_num_threads(threads)
        model, placement = _load_placed(source, torch.device(device))
        run = make_runner(model, placement, *args)
        for index, task in iter(tasks.get, None):
            results.put(("ok", index, run(task)))
    except BaseException as exc:  # reported to the parent, which raises it; nothing is swallowed
        known = isinstance(exc, LwqError)
        text = str(exc) if known else f"{type(exc).__name__}: {exc}"
        results.put(("error", device, text, exc.exit_code if known else 1, traceback.format_exc()))


def _load_placed(source: ModelSource, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A worker's copy of the model, placed on ``device`` (``lwq.models.placement.place``): built with
    its blocks on ``meta`` and read from the safetensors files (whole onto the device when it fits,
    else one block per turn), or loaded into CPU memory when it cannot be read that way."""
    from lwq.models.lazy import lazy_or_whole
    from lwq.models.placement import place

    model, loader, _how = lazy_or_whole(source.name, source.dtype, str(device), source.trust_remote_code)
    return model, place(model, device, loader, source.max_memory)


def _sensitivity_runner(model: torch.nn.Module, placement: Any, samples: torch.Tensor,
                        follow_backend: bool) -> Callable[[MeasureTask], dict[str, float]]:
    from lwq.score.sensitivity import SensitivityProbe

    probe = SensitivityProbe(model, samples, device=placement.device, loader=placement.loader)
    return lambda task: run_task(probe, task, follow_backend)


def run_parallel(source: ModelSource, devices: Sequence[str], make_runner: Callable[..., Callable[[Any], Any]],
                 args: tuple[Any, ...], tasks: Sequence[Any], on_step: Progress | None = None) -> list[Any]:
    """``tasks`` run on one worker process per entry of ``devices``, each with its own copy of the
    model and ``make_runner(model, placement, *args)`` (a module-level function: workers are
    spawned); the results in task order."""
    import multiprocessing as mp

    out: list[Any] = [None] * len(tasks)
    if not tasks:
        return out
    ctx = mp.get_context("spawn")
    todo, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(tasks):
        todo.put(item)
    threads = max(1, (os.cpu_count() or 1) // len(devices))  # the host's cores, shared by the workers
    procs = [ctx.Process(target=_worker, args=(source, d, threads, make_runner, args, todo, results), daemon=True)
             for d in devices]
    for _ in procs:
        todo.put(None)
    try:
        for p in procs:
            p.start()
        done = 0
        while done < len(tasks):
            try:
                msg = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                dead = [(d, p.exitcode) for d, p in zip(devices, procs) if p.exitcode not in (None, 0)]
                if dead or all(p.exitcode is not None for p in procs):
                    # a worker that put its result just before exiting: read what is left first
                    try:
                        msg = results.get(timeout=POLL_SECONDS)
                    except queue.Empty:
                        where = ", ".join(f"{d} (exit {c})" for d, c in dead) or "every worker"
                        raise LwqError(f"measuring worker died on {where} "
                                       f"with {len(tasks) - done} task(s) left") from None
                else:
                    continue
            if msg[0] == "error":
                _, dev, text, code, tb = msg
                raise LwqError(f"measuring on {dev} failed: {text}", code) from RuntimeError(tb)
            _, index, value = msg
            out[index] = value
            done += 1
            if on_step is not None:
                on_step(done, len(tasks))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    return out


def measure_parallel(source: ModelSource, samples: torch.Tensor, tasks: Sequence[MeasureTask], devices: Sequence[str],
                     on_step: Progress | None = None, follow_backend: bool = False) -> Entries:
    """Run ``tasks`` on one worker process per entry of ``devices`` (see module docstring)."""
    from lwq.allocate.candidates import spec_key

    entries: Entries = {}
    values = run_parallel(source, devices, _sensitivity_runner, (samples, follow_backend), tasks, on_step)
    for task, got in zip(tasks, values):
        for name, v in got.items():
            entries.setdefault(name, {})[spec_key(task.spec)] = v
    return entries


@dataclass(frozen=True)
class ParallelMeasure:
    """How planning's estimates run on worker processes on ``devices``, each loading ``source``; the
    caller's copy of the model waits on the CPU meanwhile (so a GPU never holds two copies).
    Called, it is a ``measure`` for ``lwq.score.measured.measured_errors``; ``map`` runs any other
    tasks the same way (the linearity pass: ``lwq.score.linearity``)."""

    source: ModelSource
    devices: tuple[str, ...]

    def __call__(self, model: torch.nn.Module, samples: torch.Tensor, tasks: Sequence[MeasureTask],
                 on_step: Progress | None = None, placement: Any = None, follow_backend: bool = False) -> Entries:
        if not tasks:
            return {}
        with _parked(model, placement):
            return measure_parallel(self.source, samples.cpu(), tasks, self.devices, on_step, follow_backend)

    def map(self, model: torch.nn.Module, make_runner: Callable[..., Callable[[Any], Any]], args: tuple[Any, ...],
            tasks: Sequence[Any], placement: Any = None, on_step: Progress | None = None) -> list[Any]:
        """``run_parallel`` with the caller's model parked meanwhile."""
        with _parked(model, placement):
            return run_parallel(self.source, self.devices, make_runner, args, tasks, on_step)


@contextmanager
def _parked(model: torch.nn.Module, placement: Any) -> Iterator[None]:
    from lwq.models.placement import Placement, park, unpark

    placement = placement or Placement(next(model.parameters()).device)
    park(model, placement)
    try:
        yield
    finally:
        unpark(model, placement)


def parallel_measure(source: ModelSource, devices: Sequence[str]) -> ParallelMeasure:
    """The ``ParallelMeasure`` of ``source`` on ``devices``."""
    return ParallelMeasure(source, tuple(devices))
