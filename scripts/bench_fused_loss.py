"""Peak memory and time of the fused loss (kernels/fused_ce.py) against eager linear + cross-entropy, forward and
backward, each side in a fresh process (peak RSS growth on a CPU; torch.cuda.max_memory_allocated on a GPU).

    python scripts/bench_fused_loss.py [--n 1024 --h 128 --v 32768 --chunks 128 512 --backend torch]
"""

import argparse
import json
import os
import subprocess
import sys
import time


def one(args, side, chunk):
    import resource

    import torch

    from ftlab.kernels.fused_ce import fused_linear_cross_entropy, reference_cross_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.n, args.h, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(args.v, args.h, generator=g) * 0.1).to(dev, dtype).requires_grad_()
    y = torch.randint(0, args.v, (args.n,), generator=g).to(dev)
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if side == "eager":
        loss = reference_cross_entropy(h, w, y, normalizer=args.n)
    else:
        loss = fused_linear_cross_entropy(h, w, y, normalizer=args.n, chunk=chunk, backend=args.backend)
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"side": side, "chunk": chunk, "device": dev, "peak_mib": peak / 2**20,
            "seconds": time.perf_counter() - t, "loss": loss.item()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--h", type=int, default=128)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 512])
    p.add_argument("--backend", default="auto")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one[0], int(args.one[1]))))
        return
    base = list(sys.argv[1:])
    for side, chunk in [("eager", 0)] + [("fused", c) for c in args.chunks]:
        out = subprocess.run([sys.executable, __file__, *base, "--one", side, str(chunk)], capture_output=True,
                             text=True, env=dict(os.environ), check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['side']:6} chunk {r['chunk']:5}  {r['device']}  peak +{r['peak_mib']:.0f} MiB  "
              f"{r['seconds']:.2f} s  loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
