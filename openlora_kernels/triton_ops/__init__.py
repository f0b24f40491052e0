"""Triton launchers; imported only when the Triton path is chosen (``openlora_kernels.use_triton``)."""
