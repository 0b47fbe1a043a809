"""Models: loading (hub or local directory, safely), the hub probe, structure helpers, greedy generation."""
