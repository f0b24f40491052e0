"""The data plane: a resident base model, adapter slots and a continuous-batching engine."""
