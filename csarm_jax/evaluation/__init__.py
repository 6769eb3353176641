"""Evaluation: the compiled eval step, the protocols (chunks, label shift, whole plate), metrics."""
