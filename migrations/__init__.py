"""Alembic migrations: the only way kiln's schema is created or changed."""
