"""Garrison: production-grade protection for self-hosted AI services."""

__version__ = "0.1.0"
