"""Durable state: users, API keys, issued certificates (SQLAlchemy Core; SQLite by default)."""
