"""ftlab: what a fine-tuning method gains on its target, and what the model forgets elsewhere.

Importing ftlab is cheap: no torch here, so that configs are validated before any heavy import.
"""

__version__ = "0.1.0"
