"""H2SPG's projection phase measured: each run with the half-space test (the default) or the
scheduled fade-out (``fade_out=True``), and the table rows read back from the runs' report.json.

Two kinds of run, one at a time, each skipped when its report.json already exists:

* the default run, ``asgssd run --baseline --seed S [--fade-out] --out OUT/default[-fade_out]-sS``;
* a cell of Table 4's smoke ablation (``experiments.configs.runs("table4", smoke=True)``), the
  configuration unchanged but for ``fade_out``, in ``OUT/table4/[OPT-]VARIANT-S-sSEED``
  (``OPT-`` for dhspg and proxsg_plus; H2SPG's cells have no prefix).

::

    python -m experiments.h2spg_projection default --seeds 1 2 --out runs/h2spg12
    python -m experiments.h2spg_projection table4 --optimizers dhspg proxsg_plus \\
        --sparsities 0.1 0.3 0.5 0.7 0.9 --seeds 0 --out runs/h2spg12
    # add --rows-only to print the rows of the runs already there without running anything,
    # --summary to add Table 4's form: mean ± std over the seeds

The library version of each run (``git rev-parse --short HEAD`` at its start, ``+dirty`` when
asgssd_jax/ had uncommitted changes then) is written beside its directory, as ``DIR.version``,
with the uncommitted diff of asgssd_jax/ as ``DIR.diff``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("paper", "fade_out")
VARIANT_NAMES = {"paper": "half-space test (default)", "fade_out": "fade-out (`fade_out=True`)"}


def variant_name(variant: str, optimizer: str = "h2spg") -> str:
    """ProxSG+'s default takes proximal group-lasso steps where the others take half-space ones."""
    if optimizer == "proxsg_plus" and variant == "paper":
        return "proximal step (default)"
    return VARIANT_NAMES[variant]
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- reading reports

def loss_jump(report: dict[str, Any], window: int = 3) -> tuple[float, int]:
    """Training loss over the ``window`` steps after the last projection step minus over the
    ``window`` steps up to it (steps 1-based), and that step."""
    cfg = report["config"]
    losses = {r["step"]: r["loss"] for r in report["history"]["steps"]}
    steps_per_epoch = max(losses) // cfg["epochs"]
    last = steps_per_epoch * (cfg["warmup_epochs"] + cfg["projection_epochs"])
    before = [losses[s] for s in range(last - window + 1, last + 1)]
    after = [losses[s] for s in range(last + 1, last + window + 1)]
    return statistics.mean(after) - statistics.mean(before), last


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of the tables: zero groups, how and when each became zero, accuracies."""
    zeroing = report.get("zeroing")  # None: a report written before the field existed
    jump, last = loss_jump(report)
    sub = report["subnetwork"]
    baseline = report.get("baseline") or {}
    return {
        "K": report["search_space"]["K"],
        "zero_groups": list(report["zero_groups"]),
        "valid": report["valid"],
        "zeroing": zeroing,
        "by_test": None if zeroing is None else sum(r["by"] == "test" for r in zeroing),
        "steps": sorted({r["step"] for r in zeroing or []}),
        "max_relative_norm": max((r["relative_norm"] for r in zeroing or []), default=None),
        "last_projection_step": last,
        "loss_jump": jump,
        "full": report["full"]["eval_accuracy"],
        "sub": sub["eval_accuracy"] if sub else None,
        "sub_size": f"{sub['params'] / 1e6:.3f}M / {sub['macs'] / 1e6:.1f}M" if sub else "X",
        "sgd": baseline.get("eval_accuracy"),
        "train_seconds": report["train_seconds"],
        "fade_out": report["config"].get("fade_out", False),
    }


def _pct(x: float | None) -> str:
    return "X" if x is None else f"{100 * x:.2f}"


def default_row(seed: int, variant: str, s: dict[str, Any], version: str) -> str:
    """A row under :data:`DEFAULT_HEADER`."""
    if s["zeroing"] is None:  # a report without the field: only the zero groups
        groups = ", ".join(f"g{g}" for g in s["zero_groups"]) + " (no zeroing in report.json)"
        by_test = "?"
    else:
        groups = ", ".join(f"g{r['group']} (step {r['step']}, {r['by']}, "
                           f"{r['relative_norm']:.3f})"
                           for r in sorted(s["zeroing"], key=lambda r: r["group"]))
        by_test = f"{s['by_test']} of {len(s['zeroing'])}"
    gap = ("" if s["sub"] is None or s["sgd"] is None
           else f"{100 * (s['sub'] - s['sgd']):+.2f}")
    return (f"| {seed} | {variant_name(variant)} | {groups or 'none'} | {by_test} | "
            f"{_pct(s['full'])} | {_pct(s['sub'])} | {_pct(s['sgd'])} | "
            f"{gap} | {s['sub_size']} | {s['loss_jump']:+.3f} | {s['train_seconds']:.0f} | "
            f"{version} |")


def table4_row(optimizer: str, sparsity: float, seed: int, variant: str, s: dict[str, Any],
               version: str) -> str:
    """A row under :data:`TABLE4_HEADER`."""
    steps = ", ".join(map(str, s["steps"])) or "-"
    by_test = "?" if s["by_test"] is None else s["by_test"]
    rel = "-" if s["max_relative_norm"] is None else f"{s['max_relative_norm']:.3f}"
    return (f"| {sparsity:g}, {seed} | {optimizer} | {variant_name(variant, optimizer)} | "
            f"{_pct(s['sub'])} "
            f"| {len(s['zero_groups'])} ({s['K']}) | {by_test} | {steps} | {rel} | "
            f"{s['loss_jump']:+.3f} | {version} |")


DEFAULT_HEADER = (
    "| seed | projection | zero groups (zeroed at step, by, norm relative to the search's) | "
    "by the test | full, H2SPG (%) | sub-network (%) | full, SGD only (%) | gap sub - SGD "
    "(points) | sub-network params / MACs | loss jump | H2SPG training (s) | library |\n"
    + "|---" * 12 + "|")
TABLE4_HEADER = (
    "| target sparsity, seed | optimizer | projection | sub-network top-1 (%) | zero groups (K) "
    "| by the test (ProxSG+: by its proximal step) | zeroed at step | relative norm | loss jump "
    "| library |\n" + "|---" * 10 + "|")


def table4_summary(cells: dict[tuple[str, float, int, str], dict[str, Any]],
                   optimizers: list[str], sparsities: list[float]) -> str:
    """Table 4 over the seeds: per optimizer and projection, each target sparsity's
    sub-network accuracy as mean ± std over the seeds that have a run (X counted apart), then
    the groups zeroed by the test (ProxSG+: its proximal step) of all groups zeroed, and the
    range of the loss jump at the last projection step."""
    head = ("| optimizer | projection | " + " | ".join(f"{s:g}" for s in sparsities)
            + " | by the test | loss jump |\n" + "|---" * (len(sparsities) + 4) + "|")
    lines = [head]
    for o in optimizers:
        for v in VARIANTS:
            runs = {sp: [c for (o2, sp2, _, v2), c in sorted(cells.items())
                         if (o2, sp2, v2) == (o, sp, v)] for sp in sparsities}
            every = [c for r in runs.values() for c in r]
            if not every:
                continue
            row = []
            for sp in sparsities:
                acc = [100 * c["sub"] for c in runs[sp] if c["sub"] is not None]
                x = len(runs[sp]) - len(acc)
                cell = (f"{statistics.mean(acc):.2f} ± "
                        f"{statistics.stdev(acc) if len(acc) > 1 else 0.0:.2f}" if acc else "")
                cell += (" " if cell and x else "") + (f"X in {x}" if x else "")
                row.append(f"{cell} ({len(runs[sp])})" if runs[sp] else "-")
            by_test = sum(c["by_test"] or 0 for c in every)
            zeroed = sum(len(c["zeroing"] or []) for c in every)
            jumps = [c["loss_jump"] for c in every]
            lines.append(f"| {o} | {variant_name(v, o)} | " + " | ".join(row)
                         + f" | {by_test} of {zeroed} | {min(jumps):+.3f} to {max(jumps):+.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running cells

def library_version() -> tuple[str, str]:
    """``git rev-parse --short HEAD`` (+dirty if asgssd_jax/ has uncommitted changes) and the
    uncommitted diff of asgssd_jax/."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout
    diff = git("diff", "HEAD", "--", "asgssd_jax/")
    dirty = bool(diff or git("status", "--porcelain", "--", "asgssd_jax/").strip())
    return git("rev-parse", "--short", "HEAD").strip() + ("+dirty" if dirty else ""), diff


def read_version(out: Path) -> str:
    path = out.with_name(out.name + ".version")
    return path.read_text().split()[0] if path.exists() else "?"


def _run_cell(out: Path, start: Any) -> None:
    if (out / "report.json").exists():
        return
    version, diff = library_version()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".version").write_text(
        f"{version} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    out.with_name(out.name + ".diff").write_text(diff)
    t0 = time.time()
    start()
    print(f"# {out}: {time.time() - t0:.0f} s, library {version}", file=sys.stderr, flush=True)


def default_dir(root: Path, seed: int, variant: str) -> Path:
    return root / (f"default-s{seed}" if variant == "paper" else f"default-{variant}-s{seed}")


def table4_dir(root: Path, optimizer: str, sparsity: float, seed: int, variant: str) -> Path:
    prefix = "" if optimizer == "h2spg" else f"{optimizer}-"
    return root / "table4" / f"{prefix}{variant}-{sparsity:g}-s{seed}"


def run_default(root: Path, seed: int, variant: str) -> None:
    out = default_dir(root, seed, variant)
    cmd = ["asgssd", "run", "--baseline", "--seed", str(seed), "--out", str(out), "--overwrite",
           *(["--fade-out"] if variant == "fade_out" else [])]
    _run_cell(out, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))


def run_table4(root: Path, optimizer: str, sparsity: float, seed: int, variant: str) -> None:
    from asgssd_jax import pipeline
    from experiments.configs import runs

    cells = {(r.config.optimizer, r.config.target_sparsity, r.config.seed): r.config
             for r in runs("table4", smoke=True)}
    if (optimizer, sparsity, seed) not in cells:
        raise SystemExit(f"Table 4 has no cell {optimizer} at {sparsity:g}, seed {seed}; "
                         f"sparsities {sorted({k[1] for k in cells})}, seeds 0-2")
    out = table4_dir(root, optimizer, sparsity, seed, variant)
    cfg = dataclasses.replace(cells[optimizer, sparsity, seed], out=str(out), overwrite=True,
                              fade_out=variant == "fade_out")
    _run_cell(out, lambda: pipeline.run(cfg, progress=False, log=lambda message: None))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("default", "table4"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--optimizers", nargs="+", default=["h2spg", "dhspg", "proxsg_plus"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="runs/h2spg12")
    p.add_argument("--rows-only", action="store_true", help="print the rows, run nothing")
    p.add_argument("--summary", action="store_true",
                   help="table4: also print mean ± std over the seeds (Table 4's form)")
    a = p.parse_args(argv)
    root = Path(a.out)
    if a.kind == "default":
        cells = [(seed, v) for seed in a.seeds for v in a.variants]
        for seed, v in cells:
            if not a.rows_only:
                run_default(root, seed, v)
        print(DEFAULT_HEADER)
        for seed, v in cells:
            out = default_dir(root, seed, v)
            if (out / "report.json").exists():
                report = json.loads((out / "report.json").read_text())
                print(default_row(seed, v, summary(report), read_version(out)))
    else:
        # Run in the order given (both optimizers of a sparsity together), print sorted.
        cells = [(o, s, seed, v) for seed in a.seeds for s in a.sparsities
                 for o in a.optimizers for v in a.variants]
        for cell in cells:
            if not a.rows_only:
                run_table4(root, *cell)
        print(TABLE4_HEADER)
        order = {o: i for i, o in enumerate(a.optimizers)}
        done = {}
        for cell in sorted(cells, key=lambda c: (c[2], c[1], order[c[0]], c[3] != "paper")):
            out = table4_dir(root, *cell)
            if (out / "report.json").exists():
                done[cell] = summary(json.loads((out / "report.json").read_text()))
                print(table4_row(*cell, done[cell], read_version(out)))
        if a.summary:
            print()
            print(table4_summary(done, a.optimizers, a.sparsities))


if __name__ == "__main__":
    main()
