"""Persistence: the declarative base, engines and sessions, and the Alembic migration runner."""
