"""Publishing hints (see openlora.hints) to the Redis stream workers read."""
