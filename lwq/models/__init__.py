"""Models: the architecture table, loading (whole or one block at a time), placement, block-by-block
execution and the toy model of the demo."""
