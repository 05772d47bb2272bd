"""Determinism: the same inputs and seed give byte-identical checkpoints (RTN and GPTQ), whether
the model is read lazily block by block or loaded whole; the streaming safetensors writer writes
exactly the bytes of ``safetensors.torch.save_file``."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import save_tiny, word_text
from lwq.cli import run
from lwq.formats.folder import TensorRef, sha256_file, write_safetensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(word_text(6000, seed=3))
    return root


def digests(folder) -> dict[str, str]:
    names = [f for f in sorted(folder.iterdir()) if f.suffix in (".safetensors", ".json")]
    return {f.name: sha256_file(f) for f in names}


@pytest.mark.parametrize("backend", ["rtn", "gptq"])
def test_two_runs_are_byte_identical_and_the_seed_matters(tiny, tmp_path, backend):
    argv = ["--bits", "3", "--group-size", "32", "--backend", backend, "--data", str(tiny / "calib.txt"),
            "--refine", "none",
            "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--quiet"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run(["quantize", str(tiny / "model"), "-o", str(tmp_path / name), "--seed", seed, *argv]) == 0
    a, b, c = (digests(tmp_path / n) for n in "abc")
    assert a == b and "model.safetensors" in a and "lwq_manifest.json" in a
    if backend == "gptq":  # other calibration windows, other weights; RTN needs no data
        assert a["model.safetensors"] != c["model.safetensors"]
    else:
        assert a["model.safetensors"] == c["model.safetensors"]


def test_lazy_and_eager_loading_write_the_same_bytes(tiny, tmp_path):
    from lwq.models.arch import linear_names
    from lwq.pipeline import LoadOptions, quantize_to_checkpoint
    from lwq.spec import make_spec

    spec = make_spec(4, 32, backend="gptq", act_order=True)
    common = dict(plan=lambda m: {n: spec for n in linear_names(m)}, data=str(tiny / "calib.txt"), nsamples=8,
                  seqlen=32, load=LoadOptions(device="cpu"))
    lazy = quantize_to_checkpoint(str(tiny / "model"), str(tmp_path / "lazy"), lazy=True, **common)
    eager = quantize_to_checkpoint(str(tiny / "model"), str(tmp_path / "eager"), **common)
    assert lazy.summary["loader"] == "lazy" and eager.summary["loader"] == "eager"
    assert digests(tmp_path / "lazy") == digests(tmp_path / "eager")
    # the lazy model's blocks were dropped after quantization (memory stays one block)
    assert all(t.is_meta for n, t in lazy.model.state_dict().items() if n.startswith("model.layers."))


def test_streamed_safetensors_match_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "z.weight": torch.randn(5, 3, generator=g), "a.qweight": torch.randint(-9, 9, (4, 7), dtype=torch.int32),
        "half": torch.randn(3, generator=g).half(), "bf": torch.randn(2, 2, generator=g).bfloat16(),
        "bytes": torch.randint(0, 255, (6,), dtype=torch.uint8), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False, True]), "i8": torch.arange(5, dtype=torch.int8),
        "long": torch.arange(3), "double": torch.randn(2, generator=g, dtype=torch.float64),
        "view": torch.randn(4, 4, generator=g)[:, 1],
    }
    tensors["view"] = tensors["view"].contiguous()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", {k: TensorRef.of(v) for k, v in tensors.items()}, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_streamed_writer_checks_what_it_reads(tmp_path):
    from lwq.errors import LwqError

    ref = TensorRef(torch.float32, (2, 2), lambda: torch.zeros(2, 3))
    with pytest.raises(LwqError, match="changed"):
        write_safetensors(tmp_path / "x.safetensors", {"w": ref})
