"""Small helpers shared across ftlab (files, progress bars)."""
