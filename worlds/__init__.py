"""Exact worlds: tasks with known laws and tiny HF models trained on them (docs/toyworld.md)."""
