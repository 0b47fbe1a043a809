"""Evaluation: tasks and their kinds, suites, scoring, the base cache, gain/forgetting, probes and diagnostics."""
