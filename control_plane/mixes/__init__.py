"""Named mixes: a tenant's saved mixes of adapters, called by name like an adapter."""
