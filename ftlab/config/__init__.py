"""Config: typed schemas of every group, the registry, checks and the frozen config.yaml. Pure Python: no torch, no Hydra."""
