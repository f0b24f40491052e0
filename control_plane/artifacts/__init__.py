"""Content-addressed adapter artifacts on disk: `artifacts/<sha256>/{adapter_config.json,
adapter_model.safetensors}`, received through temporary directories and published by atomic rename."""
