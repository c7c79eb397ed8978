"""Placeholder while this method is written (issue 4)."""
METHOD = None
