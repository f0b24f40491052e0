"""The adapter registry: names, visibility, LoRA hyper-parameters and artifact addresses."""
