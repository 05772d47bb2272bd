"""Orchestration: the only place where the stages (load, calibrate, score, allocate, quantize,
write, eval) meet. Core algorithms stay pure; these modules do the I/O and progress reporting.

``common``: load options, calibration windows, perplexity of a model on a text; ``analyze``:
calibration folders and layer scores; ``plan``: budgeted plans; ``quantize``: checkpoints."""
from lwq.pipeline.analyze import calibrate_to_dir, score_layers
from lwq.pipeline.common import LoadOptions, Progress, calib_batches, evaluate_ppl, source_name
from lwq.pipeline.plan import plan_for_model
from lwq.pipeline.quantize import QuantizeResult, quantize_to_checkpoint, quantize_with_budget

__all__ = ["LoadOptions", "Progress", "QuantizeResult", "calib_batches", "calibrate_to_dir", "evaluate_ppl",
           "plan_for_model", "quantize_to_checkpoint", "quantize_with_budget", "score_layers", "source_name"]
