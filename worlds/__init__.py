"""Worlds: models and tasks the toolkit measures itself on."""
