"""Block-output refinement (lwq.pipeline.refine): tuned blocks never end worse than they start,
mixed widths and formats inside one block, determinism, 0 steps = no refinement, resume, bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import run_killed_after_block, save_tiny, tiny_model, word_text
from lwq.backends import quantize_weight
from lwq.pipeline.refine import NormSteps, RefineConfig, TunedLinear, refine_block
from lwq.errors import BadInput
from lwq.formats.qlinear import QuantizedLinear, quantized_from_linear, replace_linear
from lwq.models.arch import arch_for, get_blocks, linear_weight
from lwq.models.blocks import block_norms, block_outputs, capture_block_inputs, run_block
from lwq.pipeline.blockwise import quantize_model
from lwq.pipeline.workdir import work_dir
from lwq.spec import make_spec


def _block_setup(seed: int = 0):
    model = tiny_model("llama", layers=2, hidden=64, seed=seed)
    torch.manual_seed(seed)
    ids = torch.randint(3, 128, (16, 32))
    inputs = capture_block_inputs(model, ids.split(4), "cpu")
    block = get_blocks(model)[0]
    targets = block_outputs(block, inputs, "cpu")
    return model, block, inputs, targets


def _quantize_linears(block, specs):
    layers = {}
    for lin, spec in specs.items():
        module = block.get_submodule(lin)
        qw = quantize_weight(linear_weight(module).detach().float(), spec)
        replace_linear(block, lin, quantized_from_linear(module, qw))
        layers[lin] = (qw, block.get_submodule(lin).bias, linear_weight(module).detach().float())
    return layers


def _loss(block, inputs, targets) -> float:
    with torch.no_grad():
        outs = [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    num = sum(float(((o - t) ** 2).sum()) for o, t in zip(outs, targets))
    return num / sum(t.numel() for t in targets)


def _install(block, tuned, layers):
    for lin, qw in tuned.items():
        replace_linear(block, lin, QuantizedLinear.from_quantized(qw, layers[lin][1]))


MIXED = {"self_attn.q_proj": make_spec(2, 32), "self_attn.k_proj": make_spec(3, 32),
         "self_attn.v_proj": make_spec(4, 64, sym=True), "self_attn.o_proj": make_spec(6, 32),
         "mlp.gate_proj": make_spec(4, 32, act_bits=8), "mlp.up_proj": make_spec(3, 64),
         "mlp.down_proj": make_spec(2, -1)}


def test_tuned_linear_starts_at_the_backend_result():
    W = torch.randn(24, 80)
    for spec in (make_spec(3, 32), make_spec(4, 64, sym=True), make_spec(6, 32), make_spec(4, 32, act_bits=8)):
        qw = quantize_weight(W, spec)
        got = TunedLinear(qw, None, torch.device("cpu")).result()
        assert torch.equal(got.q, qw.q) and torch.equal(got.zero, qw.zero), spec.label
        assert torch.equal(got.scale, qw.scale.float()), spec.label


def test_tuned_int8_activation_layers_compute_what_the_checkpoint_computes():
    """At its start a tuned W4A8/W6A8 layer (smoothing factors included) is the stored layer's function."""
    torch.manual_seed(0)
    W, x = torch.randn(24, 96), torch.randn(2, 5, 96) * 3
    for spec in (make_spec(4, 32, act_bits=8), make_spec(6, -1, act_bits=8)):
        qw = quantize_weight(W, spec)
        qw.extra["smooth"] = torch.rand(96) + 0.5
        tuned = TunedLinear(qw, None, torch.device("cpu"))
        stored = QuantizedLinear.from_quantized(qw)
        with torch.no_grad():
            assert torch.allclose(tuned(x), stored(x), atol=1e-5, rtol=1e-5), spec.label


def test_full_range_scales_put_the_larger_side_on_the_extreme_code():
    from lwq.backends.quant import group_index
    from lwq.pipeline.refine import full_range_scales

    W = torch.tensor([[1.0, -3.0, 0.5, 2.0], [4.0, -1.0, 0.0, 0.25]])
    s = full_range_scales(W, group_index(4, 2).long(), 2, 3)
    # row 0: groups (1, -3) and (0.5, 2): negative side larger -> +3/4; positive larger -> -2/4
    assert torch.allclose(s, torch.tensor([[0.75, -0.5], [-1.0, -0.0625]]))
    codes = torch.clamp(torch.round(W / s.repeat_interleave(2, dim=1)) + 4, 0, 7)
    assert codes[0, 1] == 0 and codes[0, 3] == 0 and codes[1, 0] == 0  # the extreme maps to code 0 exactly


def test_contiguous_groups_spread_like_g_idx_with_ragged_groups():
    for spec in (make_spec(3, 32), make_spec(4, 64, sym=True), make_spec(2, -1)):
        qw = quantize_weight(torch.randn(8, 172), spec)
        t = TunedLinear(qw, None, torch.device("cpu"))
        assert t.contiguous
        x = torch.randn(8, qw.scale.shape[1])
        assert torch.equal(t.columns(x), x[:, qw.g_idx.long()])


def test_refinement_lowers_the_block_output_error_with_mixed_widths_and_formats():
    model, block, inputs, targets = _block_setup()
    layers = _quantize_linears(block, MIXED)
    before = _loss(block, inputs, targets)
    tuned, report = refine_block(block, layers, inputs.hidden, inputs.kwargs, targets, RefineConfig(steps=40),
                                 torch.device("cpu"))
    assert all(isinstance(block.get_submodule(lin), QuantizedLinear) for lin in MIXED)  # block left as it was
    assert report.layers == len(MIXED) and report.kept
    assert report.start_loss == pytest.approx(before, rel=1e-4)
    _install(block, tuned, layers)
    after = _loss(block, inputs, targets)
    assert after < 0.9 * before
    assert after == pytest.approx(report.final_loss, rel=1e-3)
    for lin, spec in MIXED.items():  # every layer keeps its spec and a valid grid
        qw = tuned[lin]
        assert qw.spec == spec and int(qw.q.min()) >= 0 and int(qw.q.max()) < 2**spec.bits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_never_ends_worse_than_it_starts(seed):
    _, block, inputs, targets = _block_setup(seed)
    layers = _quantize_linears(block, {"mlp.down_proj": make_spec(3, 32), "self_attn.o_proj": make_spec(8, 32)})
    before = _loss(block, inputs, targets)
    # a huge step size makes most steps worse: the best seen (maybe the start) must win
    tuned, report = refine_block(block, layers, inputs.hidden, inputs.kwargs, targets,
                                 RefineConfig(steps=6, lr=5.0), torch.device("cpu"), seed=seed)
    _install(block, tuned, layers)
    assert _loss(block, inputs, targets) <= before * (1 + 1e-6)
    if not report.kept:
        assert all(tuned[lin] is layers[lin][0] for lin in layers)


def test_block_norms_are_the_normalization_weights():
    _, block, _, _ = _block_setup()
    assert [id(w) for w in block_norms(block)] == [id(block.input_layernorm.weight),
                                                   id(block.post_attention_layernorm.weight)]


def _tuned_norms(seed: int, cfg: RefineConfig, on_step=None):
    _, block, inputs, targets = _block_setup(seed)
    layers = _quantize_linears(block, MIXED)
    norms = block_norms(block)
    before = [w.detach().clone() for w in norms]
    tuned, report = refine_block(block, layers, inputs.hidden, inputs.kwargs, targets, cfg, torch.device("cpu"),
                                 seed=seed, on_step=on_step, norms=norms)
    return block, inputs, targets, layers, tuned, report, before, norms


@pytest.mark.parametrize("seed", [0, 1])
def test_tuned_norms_stay_in_place_and_lower_the_error_more(seed):
    block, inputs, targets, layers, tuned, report, before, norms = _tuned_norms(seed, RefineConfig(steps=40))
    assert report.kept and report.norms == 2
    assert all(not torch.equal(a, w) for a, w in zip(before, norms))  # tuned norms left in the block
    assert all(w.requires_grad for w in norms)  # trainable again, as they came
    _install(block, tuned, layers)
    with_norms = _loss(block, inputs, targets)
    assert with_norms == pytest.approx(report.final_loss, rel=1e-3)  # the best step's norms, not the last's
    *_, plain, _, _ = _tuned_norms(seed, RefineConfig(steps=40, norms=False))
    assert plain.norms == 0 and with_norms < plain.final_loss


def test_norms_come_back_unchanged_when_tuning_loses_or_is_interrupted():
    *_, report, before, norms = _tuned_norms(0, RefineConfig(steps=6, lr=5.0))
    assert not report.kept and all(torch.equal(a, w) for a, w in zip(before, norms))

    def stop(step, _steps, _loss):
        if step == 3:
            raise KeyboardInterrupt

    _, block, inputs, targets = _block_setup(0)
    layers = _quantize_linears(block, MIXED)
    norms = block_norms(block)
    before = [w.detach().clone() for w in norms]
    with pytest.raises(KeyboardInterrupt):
        refine_block(block, layers, inputs.hidden, inputs.kwargs, targets, RefineConfig(steps=20),
                     torch.device("cpu"), on_step=stop, norms=norms)
    assert all(torch.equal(a, w) for a, w in zip(before, norms))


def test_norm_steps_keep_small_steps_of_half_precision_weights_and_follow_the_offset():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    steps = NormSteps([w], 0.0)
    for _ in range(10):
        steps.step((torch.ones(4),), 1e-3)  # each step is below bf16's resolution at 1.0
    assert torch.allclose(steps.masters[0], torch.full((4,), 0.99)) and float(w[0]) < 1.0
    g = torch.nn.Parameter(torch.zeros(3))  # Gemma: the multiplier is 1 + weight
    NormSteps([g], 1.0).step((torch.tensor([1.0, -1.0, 0.0]),), 0.1)
    assert torch.allclose(g.detach(), torch.tensor([-0.1, 0.1, 0.0]))
    assert torch.equal(NormSteps([torch.nn.Parameter(torch.zeros(3))], 0.0).size[0], torch.zeros(3))


def test_refinement_is_deterministic_and_seeded():
    results = []
    for seed in (5, 5, 6):
        _, block, inputs, targets = _block_setup()
        layers = _quantize_linears(block, MIXED)
        tuned, _ = refine_block(block, layers, inputs.hidden, inputs.kwargs, targets,
                                RefineConfig(steps=12, batch=2), torch.device("cpu"), seed=seed)
        results.append(torch.cat([tuned[lin].q.flatten() for lin in MIXED]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])  # the seed picks the windows of each step


def test_zero_steps_is_no_refinement():
    model_a, model_b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = {n: make_spec(3, 32, backend="gptq") for n in _names(model_a)}
    quantize_model(model_a, plan, ids, "cpu", refine=None)
    quantize_model(model_b, plan, ids, "cpu", refine=RefineConfig(steps=0))
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_quantize_model_refines_every_block_against_the_full_precision_stream():
    model = tiny_model("llama", seed=4)
    ref = tiny_model("llama", seed=4)
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    plan = {n: make_spec(2, 32) for n in _names(model)}
    reports = []
    quantize_model(model, plan, ids, "cpu", refine=RefineConfig(steps=20), reports=reports)
    plain = tiny_model("llama", seed=4)
    quantize_model(plain, plan, ids, "cpu")
    assert len(reports) == len(get_blocks(model)) and all(r.final_loss <= r.start_loss for r in reports)
    with torch.no_grad():
        want = ref(ids).logits
        err = lambda m: float(((m(ids).logits - want) ** 2).mean())  # noqa: E731
        assert err(model) < err(plain)


@pytest.mark.gpu
def test_refinement_on_the_gpu_lowers_the_block_error():
    """One block refined on CUDA (block, streams and tuned tensors on the device), results on CPU."""
    model, block, inputs, targets = _block_setup()
    dev = torch.device("cuda")
    block.to(dev)
    hidden = [h.to(dev) for h in inputs.hidden]
    kwargs = [{k: (v.to(dev) if isinstance(v, torch.Tensor) else
                   tuple(x.to(dev) for x in v) if isinstance(v, tuple) else v) for k, v in kw.items()}
              for kw in inputs.kwargs]
    tgt = [t.to(dev) for t in targets]
    layers = _quantize_linears(block, MIXED)
    tuned, report = refine_block(block, layers, hidden, kwargs, tgt, RefineConfig(steps=40), dev)
    assert report.kept and report.final_loss < 0.9 * report.start_loss
    assert all(qw.q.device.type == "cpu" for qw in tuned.values())


def test_refine_config_rejects_bad_values():
    for kw in ({"steps": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"batch": 0}):
        with pytest.raises(BadInput):
            RefineConfig(**kw)


def _names(model):
    arch = arch_for(model)
    return [f"{arch.blocks}.{i}.{lin}" for i in range(len(get_blocks(model))) for lin in arch.linears]


def _lwq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lwq", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("refine")
    model = save_tiny(root / "model", layers=3)
    data = root / "calib.txt"
    data.write_text(word_text(3000))
    return model, data


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_cli_refine_zero_steps_matches_none_and_refined_run_is_reproducible(tiny_dir, tmp_path):
    model, data = tiny_dir
    common = ["--bits", "3", "--backend", "gptq", "--group-size", "32", "--data", str(data), "--nsamples", "8",
              "--seqlen", "32", "--json", "-q"]
    runs = {}
    for name, extra in (("none", ["--refine", "none"]), ("zero", ["--refine", "block", "--refine-steps", "0"]),
                        ("a", ["--refine-steps", "10"]), ("b", ["--refine", "block", "--refine-steps", "10"]),
                        ("fixed", ["--refine-steps", "10", "--no-refine-norms"])):
        r = _lwq("quantize", str(model), "-o", str(tmp_path / name), *common, *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = json.loads(r.stdout)
    assert _files(tmp_path / "none") == _files(tmp_path / "zero")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # default with --data is block; same seed, same bytes
    assert _files(tmp_path / "a") != _files(tmp_path / "none")
    assert runs["a"]["refine"] == "block" and runs["a"]["refine_steps"] == 10 and runs["a"]["grid"] == "minmax"
    assert runs["none"]["refine"] == "none"
    assert runs["a"]["refine_norms"] is True and runs["fixed"]["refine_norms"] is False
    assert runs["none"]["refine_norms"] is False
    norms = {name: _norm_tensors(tmp_path / name) for name in ("none", "a", "fixed")}
    assert norms["fixed"] == norms["none"]  # --no-refine-norms: the source's norms, byte for byte
    assert norms["a"] != norms["none"]  # tuned by default
    assert _files(tmp_path / "fixed") != _files(tmp_path / "none")  # the rounding is still tuned


def _norm_tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k).numpy().tobytes() for k in st.keys() if "norm" in k})
    assert out
    return out


def test_cli_refined_resume_is_byte_identical(tiny_dir, tmp_path):
    model, data = tiny_dir
    args = ["quantize", str(model), "--bits", "3", "--backend", "rtn", "--group-size", "32", "--data", str(data),
            "--nsamples", "8", "--seqlen", "32", "--refine-steps", "8", "-q"]
    full = _lwq(*args, "-o", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = run_killed_after_block(0, [*args, "-o", str(tmp_path / "part")], timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = work_dir(tmp_path / "part") / "inputs-00001.safetensors"
    with safe_open(str(saved), "pt") as st:  # the full-precision stream is kept for the next block
        assert any(k.startswith("reference.") for k in st.keys())
    resumed = _lwq(*args, "-o", str(tmp_path / "part"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _files(tmp_path / "full") == _files(tmp_path / "part")


@pytest.mark.parametrize("flags", [["--refine-steps", "-1"], ["--refine-lr", "0"], ["--refine", "bogus"],
                                   ["--grid", "bogus"], ["--refine-batch", "0"]])
def test_cli_bad_refine_flags_exit_2(tiny_dir, tmp_path, flags):
    model, data = tiny_dir
    r = _lwq("quantize", str(model), "--bits", "3", "--data", str(data), "-o", str(tmp_path / "o"), *flags)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
