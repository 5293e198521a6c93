"""Limits that protect the GPU: rates, concurrency slots, fair upstream slots, token budgets."""
