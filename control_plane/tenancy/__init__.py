"""Tenants, API keys (only salted hashes stored) and the authentication of callers."""
