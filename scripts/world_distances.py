#!/usr/bin/env python
"""Print how close each fine-tuning target of the default world is to each default pretraining skill, and write the
table into docs/world.md's section "## Targets and distances" (only that section; the rest of the file is kept).

Distance is measured at the cached default base model (built first if absent, ~40 s) as the cosine similarity of
mean loss gradients (ftlab.world.distance), over --seeds independent draws of --n training examples per skill; the
structural table it is set beside is ftlab.world.skills.NEIGHBOURS. Each skill's gradient is also compared with
itself on two disjoint draws (the "self" row): a cross-skill cosine far below that is what "no shared direction"
looks like at this sample size.

    python scripts/world_distances.py                 # 3 seeds x 2048 examples, ~1 min on one core
    python scripts/world_distances.py --no-write      # print only
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Targets and distances"


def measure(n: int, seeds: int) -> dict:
    import torch

    from ftlab.world import skills as sk
    from ftlab.world.base import load_base
    from ftlab.world.distance import _cos, mean_gradient

    torch.set_num_threads(1)  # the same bits on any machine, as the base itself (ftlab.world.pretrain)
    model, tok = load_base({}, progress=False)
    names = list(sk.TARGET_SKILLS) + list(sk.DEFAULT_SKILLS)
    sims = {t: {s: [] for s in sk.DEFAULT_SKILLS} for t in sk.TARGET_SKILLS}
    first: dict[str, object] = {}
    selfsim = {}
    for seed in range(seeds):
        g = {s: mean_gradient(model, tok, sk.make_examples(s, "train", n, seed=seed)) for s in names}
        if seed == 0:
            first = g
        elif seed == 1:
            selfsim = {s: _cos(first[s], g[s]) for s in names}
        for t in sk.TARGET_SKILLS:
            for s in sk.DEFAULT_SKILLS:
                sims[t][s].append(_cos(g[t], g[s]))
    return {"sims": sims, "self": selfsim, "n": n, "seeds": seeds}


def render(m: dict) -> str:
    from ftlab.world import skills as sk

    cols = list(sk.DEFAULT_SKILLS)
    lines = [SECTION, "",
             f"Cosine similarity between the mean loss gradient (every parameter, response tokens) of a target's "
             f"training examples and of each default pretraining skill's, at the default base model: mean over "
             f"{m['seeds']} draws of {m['n']} examples (min..max). **bold** = structurally near "
             f"(`ftlab.world.skills.NEIGHBOURS`). The last row, *self*, compares each skill's gradient with itself on "
             f"two different draws. Regenerate: `python scripts/world_distances.py`.", "",
             "| target | near (structural) | " + " | ".join(cols) + " | near - far |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for t, row in m["sims"].items():
        near = set(sk.NEIGHBOURS[t])
        cells = []
        for s in cols:
            v = row[s]
            c = f"{statistics.mean(v):+.3f} ({min(v):+.2f}..{max(v):+.2f})"
            cells.append(f"**{c}**" if s in near else c)
        per_seed = [statistics.mean(row[s][i] for s in cols if s in near) - statistics.mean(row[s][i] for s in cols
                                                                                          if s not in near)
                    for i in range(m["seeds"])] if near else []
        diff = (f"{statistics.mean(per_seed):+.3f} ({min(per_seed):+.2f}..{max(per_seed):+.2f})" if per_seed
                else "(none near)")
        lines.append(f"| {t} | {', '.join(sk.NEIGHBOURS[t]) or '(none)'} | " + " | ".join(cells) + f" | {diff} |")
    if m["self"]:
        lines.append("| *self* | | " + " | ".join(f"{m['self'][s]:+.3f}" for s in cols) + " | |")
        lines.append("")
        lines.append("Self-similarity of the targets: " + ", ".join(f"{t} {m['self'][t]:+.3f}" for t in m["sims"]) + ".")
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the section, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# The embedded world\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        # the measured table only: the prose below the table (after a line "<!-- end table -->") is kept
        old = pattern.search(text).group(0)
        keep = old[old.index("<!-- end table -->"):] if "<!-- end table -->" in old else ""
        text = pattern.sub(lambda _: body + ("\n" + keep if keep else "\n"), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="examples per skill and draw")
    ap.add_argument("--seeds", type=int, default=3, help="independent draws (>= 2 for the self row)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/world.md alone")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "world.md")
    a = ap.parse_args(argv)
    if a.n < 1 or a.seeds < 1:
        ap.error("--n and --seeds must be >= 1")
    body = render(measure(a.n, a.seeds))
    print(body)
    if not a.no_write:
        write_section(a.out, body)
        print(f"wrote {a.out} ({SECTION})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
