"""The run directory: its identity (name from the config), layout and lock, and the one writer of result.json."""
