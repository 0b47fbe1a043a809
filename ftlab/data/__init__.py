"""Training and evaluation data: local jsonl, hub datasets, the synthetic world; formats, held-out split, mixing."""
