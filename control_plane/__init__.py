"""The control plane: registry, tenants and keys, artifacts, usage and billing in Postgres."""
