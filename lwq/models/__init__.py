"""Model loading, the architecture table and block-by-block execution."""
from lwq.models.arch import ARCH_TABLE, ArchSpec, arch_for, get_blocks, linear_names
from lwq.models.blocks import BlockInputs, capture_block_inputs, run_block
from lwq.models.load import load_model, load_tokenizer

__all__ = ["ARCH_TABLE", "ArchSpec", "arch_for", "get_blocks", "linear_names", "BlockInputs",
           "capture_block_inputs", "run_block", "load_model", "load_tokenizer"]
