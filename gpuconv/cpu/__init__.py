"""The NumPy path's model executor in the batch-innermost (C, H, W, N) layout."""
