"""Triton launchers; imported only when the Triton path is chosen (``kernels.use_triton``)."""
