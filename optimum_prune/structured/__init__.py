"""Structured pruning: remove MLP channels, attention KV groups and whole decoder blocks, so that the result is
a smaller dense model that stock transformers classes load."""
