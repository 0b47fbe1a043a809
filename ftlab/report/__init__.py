"""Reporting: loggers (console, wandb)."""
