"""Pure torch visualization methods (no Lightning): ``fn(model, x[B, C, H, W], ...) -> Tensor[B, ...]``."""
