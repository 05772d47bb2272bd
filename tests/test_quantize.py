"""The block-sequential driver: partial plans, resume from a block, calibrated GPTQ vs RTN."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from lwq.errors import BadInput
from lwq.formats.qlinear import QuantizedLinear
from lwq.models.arch import linear_names
from lwq.calib.stats import InputAccumulator
from lwq.pipeline.blockwise import quantize_model
from lwq.spec import make_spec


def batches(n=8, seqlen=24):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=batches(2, 16)).logits


def test_layers_outside_the_plan_stay():
    model = tiny_model("llama")
    names = linear_names(model)
    plan = {n: make_spec(4, 32) for n in names if "mlp" in n}
    done = quantize_model(model, plan, None, "cpu")
    assert set(done) == set(plan)
    for n in names:
        assert isinstance(model.get_submodule(n), QuantizedLinear) == (n in plan)


def test_resume_from_saved_block_inputs_gives_the_same_model():
    plan = {n: make_spec(3, 32, backend="gptq") for n in linear_names(tiny_model("llama"))}
    full = tiny_model("llama")
    quantize_model(full, plan, batches(), "cpu")

    class Killed(Exception):
        pass

    saved = {}

    def stop_after_first(i, layers, next_inputs):
        saved.update(block=i, layers=layers, inputs=next_inputs)
        raise Killed

    part = tiny_model("llama")
    with pytest.raises(Killed):
        quantize_model(part, plan, batches(), "cpu", on_block=stop_after_first)
    assert saved["block"] == 0 and len(saved["layers"]) == 7 and len(saved["inputs"]) == 1
    quantize_model(part, plan, None, "cpu", start_block=1, inputs=saved["inputs"])
    assert torch.allclose(logits(part), logits(full), atol=1e-6)


def test_gptq_with_calibration_beats_rtn_on_the_model_output():
    ref = logits(tiny_model("llama"))
    errs = {}
    for backend in ("rtn", "gptq"):
        model = tiny_model("llama")
        quantize_model(model, {n: make_spec(3, 32, backend=backend) for n in linear_names(model)}, batches(16, 32),
                       "cpu")
        errs[backend] = float((logits(model) - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_input_stats_running_mean():
    x = torch.randn(3, 10, 6)
    s = InputAccumulator(6, torch.device("cpu"), scale=2.0)  # GPTQ's scaling
    s.add(x[:1])
    s.add(x[1:])
    flat = x.reshape(-1, 6)
    assert torch.allclose(s.H, 2 * flat.t() @ flat / 30, atol=1e-5)
    assert torch.equal(s.absmax, flat.abs().amax(0))


def test_plan_errors():
    model = tiny_model("llama")
    with pytest.raises(BadInput, match="not block linears"):
        quantize_model(model, {"lm_head": make_spec(4)}, None, "cpu")
    with pytest.raises(BadInput, match="calibration"):
        quantize_model(model, {linear_names(model)[0]: make_spec(4, backend="gptq")}, None, "cpu")
