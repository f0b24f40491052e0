"""The continuous-batching engine: scheduling, paged KV, adapter slots, sampling."""
