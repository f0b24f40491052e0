"""The base model: config parsing, checkpoint loading, Llama-family layers with LoRA slot pools."""
