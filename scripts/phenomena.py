"""docs/phenomena.md: which findings of the seed papers the embedded world reproduces — the overlays' sweeps, one
`ftlab report` per finding, and a verdict by a fixed rule.

    OMP_NUM_THREADS=1 python scripts/phenomena.py            # run every overlay's sweep (resumable), then the docs
    python scripts/phenomena.py --no-run                     # only re-read finished runs and rewrite the docs

All sweeps write into one directory (outputs/phenomena, or --outputs): run directories are named by their config,
so a run two findings share (the full fine-tuning runs of lora_vs_full are kl_tradeoff's weight 0) is trained once.
Each finding's runs are picked from it by their config.yaml; its report (report.md, report.csv, PNGs) goes to
docs/phenomena/<name>/, or a finding on the same runs as an earlier one links that one's.

The verdict rule, fixed before any run (nothing is tuned toward the expected answer: every overlay keeps the
defaults except the knob it sweeps): each finding is one or two statistics, a difference per seed (paired by seed
where two arms share seeds), folded over seeds into a mean and a 95% t-interval (ftlab.report.stats.fold).
"reproduced" when every interval lies on the predicted side of 0; "opposite" when one lies on the other side;
"no difference" when an interval holds 0 (and none is opposite).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftlab.report.compare import trajectory  # noqa: E402
from ftlab.report.runs import Run, discover  # noqa: E402
from ftlab.report.stats import fold, forgetting_at_gain  # noqa: E402

SEEDS = (0, 1, 2)


def load(outputs: Path) -> list[Run]:
    """The completed runs under `outputs` (read and deduplicated as `ftlab report` does)."""
    return discover([str(outputs)]).completed if outputs.exists() else []


def _method(r: Run) -> str:
    return r.config["method"]["name"]


def _value(key: str) -> Callable[[Run], Optional[float]]:
    return lambda r: r.summary().get(key)


def _variant(r: Run, name: str) -> Optional[dict]:
    return next((v for v in r.result.get("variants") or [] if v.get("name") == name), None)


# ------------------------------------------------------------------------------------------- run filters
def _size(c: dict) -> Optional[str]:
    return c["model"]["name_or_path"] == "tiny" and (c["model"].get("world") or {}).get("size")


def _single(c: dict, skill: str = "sub", size: str = "tiny") -> bool:
    """One target, no replay, no regulariser: the plain fine-tuning run of `skill` on the world of `size`."""
    return (not c.get("stages") and c["data"].get("skill") == skill and not c["data"].get("mix")
            and (c.get("reg") or {}).get("kind", "none") == "none" and _size(c) == size)


def _methods(*names: str) -> Callable[[dict], bool]:
    return lambda c: c["method"]["name"] in names


# ------------------------------------------------------------------------------------------- statistics
def _by(runs: list[Run], pred: Callable[[Run], bool]) -> dict[int, Run]:
    out: dict[int, Run] = {}
    for r in runs:
        if pred(r):
            if r.seed in out:
                raise SystemExit(f"two runs of seed {r.seed} in one arm: {out[r.seed].path.name}, {r.path.name}")
            out[r.seed] = r
    return out


def paired(a: dict[int, Run], b: dict[int, Run], value: Callable[[Run], Optional[float]]) -> dict:
    """fold of value(a) - value(b) over the seeds both arms have."""
    seeds = sorted(set(a) & set(b))
    diffs = []
    for s in seeds:
        va, vb = value(a[s]), value(b[s])
        diffs.append(None if va is None or vb is None else va - vb)
    return {**fold(diffs), "seeds": seeds}


def matched_level(runs: list[Run]) -> Optional[float]:
    """The highest multiple of 10 that every run's trajectory reaches: the gain at which forgetting is compared."""
    tops = [max((g for g, _ in trajectory(r) or [] if g is not None), default=None) for r in runs]
    if not tops or any(t is None for t in tops):
        return None
    return float(int(min(tops) // 10 * 10)) or None


def at_level(level: Optional[float]) -> Callable[[Run], Optional[float]]:
    return lambda r: None if level is None else forgetting_at_gain(trajectory(r) or [], level)


def verdict(stats: list[tuple[dict, int]]) -> str:
    """stats: (fold, predicted sign +1/-1)."""
    sides = []
    for f, sign in stats:
        if f.get("lo") is None:
            return "not enough runs"
        lo, hi = f["lo"] * sign, f["hi"] * sign
        sides.append("pred" if lo > 0 else "opp" if hi < 0 else "zero")
    n = {k: sides.count(k) for k in ("pred", "zero", "opp")}
    if n["pred"] == len(sides):
        return "reproduced"
    if n["opp"] == len(sides):
        return "opposite"
    if n["zero"] == len(sides):
        return "no difference"
    return (f"partly ({n['pred']} of {len(sides)} as predicted" + (f", {n['zero']} hold 0" if n["zero"] else "")
            + (f", {n['opp']} opposite" if n["opp"] else "") + ")")


def fmt(f: dict) -> str:
    if f.get("mean") is None:
        return "—"
    if f.get("lo") is None:
        return f"{f['mean']:+.1f}"
    return f"{f['mean']:+.1f} [{f['lo']:+.1f}, {f['hi']:+.1f}]"


# ------------------------------------------------------------------------------------------- the findings
@dataclass
class Finding:
    name: str
    overlay: str
    claim: str
    paper: str
    select: Callable[[dict], bool]
    commands: list[list[str]] = field(default_factory=list)  # extra sweeps beside `-m +experiment=<overlay>`
    args: list[str] = field(default_factory=list)  # overrides of the overlay's own sweep

    def sweeps(self) -> list[list[str]]:
        return [["ftlab", "run", "-m", f"+experiment={self.overlay}", *self.args], *self.commands]


def _lora_vs_full(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    lora, full = _by(runs, lambda r: _method(r) == "lora"), _by(runs, lambda r: _method(r) == "full")
    level = matched_level(list(lora.values()) + list(full.values()))
    return [("gain, full − LoRA (LoRA learns less: > 0)", paired(full, lora, _value("gain")), +1),
            (f"forgetting at gain {level:g}, LoRA − full (LoRA forgets less: < 0)" if level else
             "forgetting at matched gain (no common level)", paired(lora, full, at_level(level)), -1)], ""


def _distance(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    out = []
    for skill in ("sub", "rot1"):
        arm = [r for r in runs if r.config["data"].get("skill") == skill]
        vals = [(r.summary().get("forgetting_near"), r.summary().get("forgetting_far")) for r in arm]
        f = fold([None if n is None or fa is None else n - fa for n, fa in vals])
        out.append((f"{skill}: near − far forgetting, lora and full runs (closer forgotten more: > 0)", f, +1))
    for m in ("lora", "full"):
        near_t = _by(runs, lambda r, m=m: _method(r) == m and r.config["data"].get("skill") == "sub")
        far_t = _by(runs, lambda r, m=m: _method(r) == m and r.config["data"].get("skill") == "depth")
        out.append((f"{m}: forgetting, target sub − target depth (the far target forgets less: > 0)",
                    paired(near_t, far_t, _value("forgetting")), +1))
    return out, ""


def _replay(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    out = []
    for m in ("lora", "full"):
        plain = _by(runs, lambda r, m=m: _method(r) == m and not r.config["data"].get("mix"))
        mix = _by(runs, lambda r, m=m: _method(r) == m and r.config["data"].get("mix"))
        out.append((f"{m}: forgetting, no replay − 20 % replay (> 0)", paired(plain, mix, _value("forgetting")), +1))
        out.append((f"{m}: gain, no replay − 20 % replay (the cost; not judged)", paired(plain, mix, _value("gain")), 0))
    return out, ""


def _kl(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    def weight(r: Run) -> float:
        reg = r.config.get("reg") or {}
        return 0.0 if reg.get("kind", "none") == "none" else float(reg["weight"])
    w0 = _by(runs, lambda r: weight(r) == 0.0)
    wmax = max({weight(r) for r in runs})
    w1 = _by(runs, lambda r: weight(r) == wmax)
    return [(f"gain, weight 0 − weight {wmax:g} (KL costs gain: > 0)", paired(w0, w1, _value("gain")), +1),
            (f"forgetting, weight 0 − weight {wmax:g} (KL keeps more: > 0)", paired(w0, w1, _value("forgetting")),
             +1)], ""


def _hft(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    hft, full = _by(runs, lambda r: _method(r) == "hft"), _by(runs, lambda r: _method(r) == "full")
    level = matched_level(list(hft.values()) + list(full.values()))
    return [(f"forgetting at gain {level:g}, full − HFT (HFT forgets less: > 0)" if level else
             "forgetting at matched gain (no common level)", paired(full, hft, at_level(level)), +1),
            ("gain, full − HFT (similar gain; not judged)", paired(full, hft, _value("gain")), 0)], ""


INTRUDER_KEY = "k10_eps0.5"  # top 10 singular vectors of each tuned matrix, max |cos| to every base one < 0.5


def _intruders(r: Run) -> Optional[float]:
    w = ((r.result.get("diagnostics") or {}).get("weights") or {}).get("intruders") or {}
    return w.get(INTRUDER_KEY)


def _intruder(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    lora, full = _by(runs, lambda r: _method(r) == "lora"), _by(runs, lambda r: _method(r) == "full")
    both = [r for r in runs if _method(r) in ("lora", "full")]
    per = "; ".join(f"{_method(r)} s{r.seed}: {_intruders(r)}" for r in sorted(both, key=lambda r: (_method(r), r.seed)))
    return [(f"intruder dimensions ({INTRUDER_KEY}, summed over the 14 matrices), LoRA − full (> 0)",
             paired(lora, full, _intruders), +1)], f"Counts per run: {per}."


def _post(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    out = []
    for m in ("full", "lora"):
        arm = _by(runs, lambda r, m=m: _method(r) == m)
        for name in ("interp_a0.75", "lines_a0.5_b0.5"):
            def net(r: Run, name=name) -> Optional[float]:
                v = _variant(r, name)
                if v is None:
                    return None
                recovered = r.summary()["forgetting"] - v["forgetting"]
                cost = r.summary()["gain"] - v["gain"]
                return recovered - cost
            out.append((f"{m} {name}: forgetting recovered − gain lost (recovery at a small cost: > 0)",
                        fold([net(r) for r in arm.values()]), +1))
    return out, ""


def _continual(runs: list[Run]) -> tuple[list[tuple[str, dict, int]], str]:
    def bwt(r: Run) -> Optional[float]:
        return (r.result.get("continual") or {}).get("bwt")
    plain = _by(runs, lambda r: not r.config["data"].get("replay_previous"))
    replay = _by(runs, lambda r: bool(r.config["data"].get("replay_previous")))
    return [("BWT without replay (learning rot1 undoes sub: < 0)", fold([bwt(r) for r in plain.values()]), -1),
            ("BWT, 20 % replay of the earlier stage − none (replay reduces it: > 0)", paired(replay, plain, bwt), +1)], ""


FINDINGS: list[tuple[Finding, Callable]] = [
    (Finding("lora_vs_full", "lora_vs_full", "LoRA learns less and forgets less than full fine-tuning (at matched gain)",
             "Biderman et al. 2024, *LoRA Learns Less and Forgets Less*",
             lambda c: _single(c) and _methods("lora", "full")(c)), _lora_vs_full),
    (Finding("distance", "distance", "Forgetting is larger for skills closer to the target",
             "Kotha et al. 2024, *Understanding Catastrophic Forgetting in Language Models via Implicit Inference*",
             lambda c: any(_single(c, s) for s in ("sub", "rot1", "depth")) and _methods("lora", "full")(c)),
     _distance),
    (Finding("replay", "replay", "Replay of pretraining data cuts forgetting",
             "Scialom et al. 2022, *Fine-tuned Language Models are Continual Learners*; Ibrahim et al. 2024",
             lambda c: not c.get("stages") and _size(c) == "tiny" and c["data"].get("skill") == "sub"
             and c["data"].get("mix") in (0, 0.0, 0.2, None)
             and (c.get("reg") or {}).get("kind", "none") == "none" and _methods("lora", "full")(c)), _replay),
    (Finding("kl_tradeoff", "kl_tradeoff", "A KL penalty to the base trades gain for retention",
             "the KL-regularised fine-tuning baselines of the seed papers (docs/methods.md, reg=kl)",
             lambda c: not c.get("stages") and _size(c) == "tiny" and c["data"].get("skill") == "sub"
             and not c["data"].get("mix") and _methods("full")(c)),
     _kl, ),
    (Finding("hft_vs_full", "hft_vs_full", "Half Fine-Tuning forgets less than full fine-tuning at similar gain",
             "Hui et al. 2024, *HFT: Half Fine-Tuning for Large Language Models*",
             lambda c: _single(c) and _methods("hft", "full")(c)), _hft),
    (Finding("intruder", "intruder", "LoRA's updates show intruder dimensions that full fine-tuning's do not",
             "Shuttleworth et al. 2024, *LoRA vs Full Fine-tuning: An Illusion of Equivalence*",
             lambda c: _single(c) and _methods("lora", "full")(c)), _intruder),
    (Finding("post_recovery", "post_recovery",
             "Interpolating toward the base (WiSE-FT) or LiNeS recovers forgotten skills at a small cost in gain",
             "Wortsman et al. 2022 (WiSE-FT); Wang et al. 2024, *LiNeS*",
             lambda c: _single(c) and _methods("lora", "full")(c)), _post),
    (Finding("continual", "continual_two_stage",
             "Continual training on two targets in sequence forgets the first (BWT < 0); replay of earlier stages reduces it",
             "Luo et al. 2023, *An Empirical Study of Catastrophic Forgetting in LLMs During Continual Fine-tuning*",
             lambda c: bool(c.get("stages")) and _size(c) == "tiny"), _continual),
    (Finding("lora_vs_full_small", "lora_vs_full",
             "LoRA learns less and forgets less than full fine-tuning, on the 1M world (world.size=small; r=8 is 1/16 "
             "of its width)", "Biderman et al. 2024",
             lambda c: _single(c, size="small") and _methods("lora", "full")(c), args=["model.world.size=small"]),
     _lora_vs_full),
    (Finding("lora_vs_full_medium", "lora_vs_full",
             "LoRA learns less and forgets less than full fine-tuning, on the 5M world (world.size=medium; r=8 is "
             "1/32 of its width)", "Biderman et al. 2024",
             lambda c: _single(c, size="medium") and _methods("lora", "full")(c), args=["model.world.size=medium"]),
     _lora_vs_full),
]
FINDINGS[3][0].commands.append(["ftlab", "run", "-m", "+experiment=kl_tradeoff", "reg=kl", "reg.weight=1.0"])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-run", action="store_true", help="only read finished runs")
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "phenomena")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = ap.parse_args(argv)
    env = {**os.environ, "FTLAB_OUTPUTS": str(a.outputs), "FTLAB_PROGRESS": "0"}
    if not a.no_run:
        for f, _ in FINDINGS:
            for cmd in f.sweeps():
                print("$", shlex.join(cmd), flush=True)
                subprocess.run(cmd, env=env, cwd=ROOT, check=False)
    runs = load(a.outputs)
    if not runs:
        raise SystemExit(f"no completed run under {a.outputs}/runs; run without --no-run first")
    rows, sections = [], []
    reported: dict[frozenset, str] = {}  # run set -> the finding whose report shows it (intruder = lora_vs_full's runs)
    for f, stat in FINDINGS:
        mine = [r for r in runs if f.select(r.config)]
        if not mine:
            rows.append(f"| {f.claim} | {f.paper} | `{shlex.join(f.sweeps()[0])}` | 0 | not run |")
            continue
        key = frozenset(r.path for r in mine)
        if key not in reported:
            reported[key] = f.name
            out = a.docs / "phenomena" / f.name
            p = subprocess.run([sys.executable, "-m", "ftlab", "report", *[str(r.path) for r in mine], "--out",
                                str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"ftlab report for {f.name} failed: {p.stderr.strip()[-2000:]}")
            # report.md, report.csv and the PNGs stay; report.html is the same page with the PNGs embedded again
            (out / "report.html").unlink(missing_ok=True)
        shown = reported[key]
        stats, note = stat(mine)
        v = verdict([(s, sign) for _, s, sign in stats if sign])
        rows.append(f"| {f.claim} | {f.paper} | `{shlex.join(f.sweeps()[0])}` | {len(mine)} | **{v}** |")
        lines = [f"## {f.claim}", "", f"Seed paper: {f.paper}. Runs: {len(mine)} "
                 f"(seeds {', '.join(map(str, sorted({r.seed for r in mine})))}); report: "
                 f"[phenomena/{shown}/report.md](phenomena/{shown}/report.md).", "", "```bash",
                 *(f"FTLAB_OUTPUTS=outputs/phenomena {shlex.join(c)}" for c in f.sweeps()),
                 f"ftlab report <those runs> --out docs/phenomena/{shown}", "```", "",
                 "| statistic (per seed, then mean and 95% t-interval over seeds) | value | seeds |", "|---|---|---|"]
        lines += [f"| {label} | {fmt(s)} | {s['n']} |" for label, s, _ in stats]
        lines += ["", f"Verdict: **{v}**." + (f" {note}" if note else ""), ""]
        sections.append("\n".join(lines))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    head = ["# Phenomena: which findings the embedded world reproduces", "",
            f"Generated by `python scripts/phenomena.py` ({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"ftlab {commit.strip()}) from the runs under `outputs/phenomena/`: the default world (`world.size=tiny`), "
            "the defaults of `ftlab run` except each overlay's swept knob, seeds 0, 1, 2. The rule (fixed before the "
            "runs, in the script's docstring): a finding is **reproduced** when the 95% interval of each of its "
            "statistics lies on the predicted side of 0, **opposite** when it lies on the other side, **no "
            "difference** when it holds 0; rows marked 'not judged' are context. Nothing was tuned toward an "
            "expected answer.", "",
            "| finding | seed paper | command | runs | verdict |", "|---|---|---|---|---|", *rows, ""]
    notes = a.docs / "phenomena" / "notes.md"
    tail = ["## Reading", "", notes.read_text()] if notes.is_file() else []
    (a.docs / "phenomena.md").write_text("\n".join(head + sections + tail) + "\n")
    print((a.docs / "phenomena.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
