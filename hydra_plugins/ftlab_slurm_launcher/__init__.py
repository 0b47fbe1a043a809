"""ftlab's SLURM launcher as a Hydra plugin (Hydra instantiates launchers only from the hydra_plugins package).

The code is in ftlab/slurm.py; this module only gives the class a name Hydra accepts and submitit can import by
reference inside the job.
"""

from ftlab.slurm import SlurmLauncherBase


class SlurmLauncher(SlurmLauncherBase):
    pass
