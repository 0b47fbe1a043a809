"""Starting a run: in this process or through torchrun, the worker entry, and the Hydra-free SLURM job side."""
