"""Usage events (idempotent by request id) and the hourly counters billing reads."""
