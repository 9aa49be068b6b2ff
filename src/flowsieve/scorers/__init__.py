"""Scorers: pure functions from observations (tensors) to per-token importance. No transformers here."""
