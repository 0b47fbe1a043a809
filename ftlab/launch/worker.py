"""`python -m ftlab.launch.worker RUN_DIR`: one rank of a torchrun launch (ftlab.launch.torchrun.launch). Reads
RUN_DIR/config.yaml; never imports Hydra. Exit code 0: completed; 1: failed (result.json says why); 3: preempted
(resumes on restart)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ftlab.launch.worker RUN_DIR", file=sys.stderr)
        return 2
    from ftlab.pipeline import RunFailed, run_from_dir
    from ftlab.rundir.identity import ResumeRefused
    from ftlab.rundir.layout import RunDirBusy
    from ftlab.train import distributed as dist
    from ftlab.train import preempt

    preempt.install_from_env()  # in a SLURM job (ftlab.launch.slurm_job): a stop signal checkpoints at a step end
    try:
        run_from_dir(Path(argv[0]))
    except preempt.Preempted:
        return 3
    except RunFailed as e:
        if dist.is_main():
            print(f"ftlab: run failed: {e}\n  record: {Path(argv[0]) / 'result.json'}", file=sys.stderr)
        return 1
    except (ResumeRefused, RunDirBusy) as e:
        print(f"ftlab: run refused (rank {dist.world()[0]}): {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
