"""Reading PEFT LoRA directories into tensors ready for a slot, and runtime mixes of adapters."""
