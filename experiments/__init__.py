"""Runnable studies: ``python -m experiments.<name>`` (see each module's docstring)."""
