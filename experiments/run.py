"""Runs the paper's experiments and prints our numbers beside the paper's.

    python -m experiments.run table1 [table4 ...|all] [--smoke] [--data-dir D] [--out DIR]

Every run goes through :func:`asgssd_jax.pipeline.run` into its own directory
(``OUT/NAME[-smoke]/ROW-COLUMN-sSEED``); a run whose ``report.json`` already holds the same
configuration is read back instead of run again (``--rerun`` forces it), so an interrupted
experiment continues where it stopped. Each experiment's table is printed as Markdown and
written to ``OUT/NAME[-smoke].md`` with the collected numbers in ``OUT/NAME[-smoke].json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from experiments.configs import EXPERIMENTS, Run, runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _run_dir(out: Path, run: Run) -> Path:
    name = _slug(run.row) + (f"-{_slug(run.column)}" if run.column else "")
    return out / f"{name}-s{run.config.seed}"


def _same_config(report_path: Path, config: dict) -> bool:
    if not report_path.exists():
        return False
    old = json.loads(report_path.read_text()).get("config", {})
    # Fields added to RunConfig since that run: what the run did before they existed (their
    # defaults, except the learning-rate warm-up, which came with a default of 1 epoch).
    from asgssd_jax.pipeline import RunConfig

    old = {**dataclasses.asdict(RunConfig()), "lr_warmup_epochs": 0, **old}
    # How a run was started (continued, replaced, logged) is not what it computes.
    how = ("resume", "overwrite", "log_every")
    old, config = ({k: v for k, v in c.items() if k not in how} for c in (old, config))
    # JSON has lists where the config has tuples.
    return json.loads(json.dumps(old)) == json.loads(json.dumps(config))


def _record(run: Run, report: dict, wall: float) -> dict[str, Any]:
    """The numbers of one run that the tables use (report.json keeps everything else)."""
    sub = report["subnetwork"]
    cfg = report["config"]
    curve = report["history"]["sparsity"]  # one entry per training step
    zero_steps = [c["step"] for c in curve if c["zero_groups"] > 0]
    steps_per_epoch = len(curve) // cfg["epochs"] if curve else 0
    return {
        "row": run.row, "column": run.column, "seed": cfg["seed"], "out": cfg["out"],
        "model": report["model"], "dataset": report["dataset"],
        "num_groups": report["search_space"]["num_groups"], "K": report["search_space"]["K"],
        "zero_groups": report["zero_groups"], "valid": report["valid"],
        "full": {k: report["full"][k] for k in ("params", "macs", "eval_accuracy")},
        "subnetwork": None if sub is None else
        {k: sub[k] for k in ("params", "macs", "eval_accuracy")},
        "baseline_accuracy": (report["baseline"] or {}).get("eval_accuracy"),
        "finetune_accuracy": (report["finetune"] or {}).get("eval_accuracy"),
        "train_seconds": report["train_seconds"],
        "search_cost_seconds": report["search_cost_seconds"],
        "search_phase_seconds": report["train_seconds"] * cfg["warmup_epochs"] / cfg["epochs"],
        # when groups first became exactly zero, and the last step of the projection phase
        # (where H2SPG and its baselines zero whatever is left of the redundant groups)
        "first_zero_step": zero_steps[0] if zero_steps else None,
        "last_projection_step": steps_per_epoch * (cfg["warmup_epochs"]
                                                   + cfg["projection_epochs"]),
        "wall_seconds": wall,
        "paper": run.paper,
        "export_error": report.get("export_error"),
        "code_version": report.get("code_version"),
        "versions": report["versions"],
    }


def _code_version() -> str | None:
    """The git commit of the library, with "+dirty" if asgssd_jax/ or models/ differ from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "asgssd_jax", "models"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def run_experiment(name: str, *, smoke: bool, data_dir: str | None, out: Path,
                   rerun: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Runs (or reads back) every run of ``name``; returns the collected records and table."""
    from asgssd_jax.pipeline import run as pipeline_run

    tag = name + ("-smoke" if smoke else "")
    exp_dir = out / tag
    code_version = _code_version()
    records = []
    t0 = time.perf_counter()
    todo = runs(name, smoke=smoke, data_dir=data_dir)
    for i, r in enumerate(todo, 1):
        # A smoke run starts afresh in its directory; a full-scale run resumes there.
        cfg = dataclasses.replace(r.config, out=str(_run_dir(exp_dir, r)),
                                  overwrite=not r.config.resume)
        label = f"{tag} {i}/{len(todo)} {r.row} {r.column} seed {cfg.seed}".replace("  ", " ")
        report_path = Path(cfg.out) / "report.json"
        if not rerun and _same_config(report_path, dataclasses.asdict(cfg)):
            report, wall = json.loads(report_path.read_text()), None
            print(f"[{label}] read back {report_path}", flush=True)
        else:
            start = time.perf_counter()
            log = (lambda s, label=label: print(f"[{label}] {s}", flush=True)) if verbose \
                else (lambda s: None)
            try:
                report = pipeline_run(cfg, progress=False, log=log)
            except Exception as e:  # one failing run must not lose the others
                print(f"[{label}] FAILED: {type(e).__name__}: {e}", flush=True)
                records.append({"row": r.row, "column": r.column, "seed": cfg.seed,
                                "out": cfg.out, "error": f"{type(e).__name__}: {e}",
                                "paper": r.paper})
                continue
            wall = time.perf_counter() - start
            print(f"[{label}] done in {wall:.1f} s", flush=True)
            report["code_version"] = code_version
            report_path.write_text(json.dumps(report, indent=2, default=str))
        records.append(_record(r, report, wall))
    failed = [rec for rec in records if "error" in rec]
    records = [rec for rec in records if "error" not in rec]
    exp = EXPERIMENTS[name]
    table = (_rows_table if exp.layout == "rows" else _grid_table)(records) if records else ""
    notes = [exp.note] if exp.note else []
    notes += [f"FAILED run {f['out']}: {f['error']}" for f in failed]
    notes += [f"sub-network export failed in {rec['out']} (numbers unaffected): "
              f"{rec['export_error']}" for rec in records if rec.get("export_error")]
    result = {"experiment": name, "title": exp.title, "smoke": smoke, "data_dir": data_dir,
              "code_version": code_version, "notes": notes,
              "wall_seconds": time.perf_counter() - t0, "records": records, "failed": failed,
              "table": table}
    text = f"## {exp.title}{' (smoke)' if smoke else ''}\n\n{table}\n" + "".join(
        f"\n{n}\n" for n in notes) + "\nLibrary version (git commit) of the runs: " + ", ".join(
        sorted({str(r["code_version"]) for r in records})) + ".\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n" + text, flush=True)
    return result


# ---------------------------------------------------------------------------------- tables


def _m(x: float | None, digits: int = 3) -> str:
    return "" if x is None else f"{x / 1e6:.{digits}f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _paper(p: dict, key: str) -> str:
    return "" if p.get(key) is None else str(p[key])


def _rows_table(records: list[dict]) -> str:
    """Per network: the full network and the sub-network, ours beside the paper's."""
    lines = ["| network | dataset | trained as | params (M) | paper | MACs (M) | paper | "
             "top-1 (%) | paper | K / groups | H2SPG train (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in records:
        base, subp = r["paper"].get("baseline", {}), r["paper"].get("subnetwork", {})
        full_acc = r["baseline_accuracy"]
        full_name = "full, base optimizer" if full_acc is not None else \
            "full, H2SPG-trained (zero groups in place)"
        full_acc = r["full"]["eval_accuracy"] if full_acc is None else full_acc
        head = f"| {r['row']} | {r['dataset']} |"
        lines.append(f"{head} {full_name} | {_m(r['full']['params'])} | {_paper(base, 'params')} | "
                     f"{_m(r['full']['macs'], 1)} | {_paper(base, 'macs')} | {_pct(full_acc)} | "
                     f"{_paper(base, 'acc')} | | |")
        sub = r["subnetwork"]
        kg = f"{len(r['zero_groups'])} (K={r['K']}) / {r['num_groups']}"
        if sub is None:
            lines.append(f"{head} sub-network | X (invalid: zero groups {r['zero_groups']}) | "
                         f"{_paper(subp, 'params')} | | {_paper(subp, 'macs')} | | "
                         f"{_paper(subp, 'acc')} | {kg} | {r['train_seconds']:.0f} |")
            continue
        acc = _pct(sub["eval_accuracy"])
        if r["finetune_accuracy"] is not None:
            acc += f" (fine-tuned {_pct(r['finetune_accuracy'])})"
        lines.append(f"{head} ASGSSD sub-network | {_m(sub['params'])} | {_paper(subp, 'params')} "
                     f"| {_m(sub['macs'], 1)} | {_paper(subp, 'macs')} | {acc} | "
                     f"{_paper(subp, 'acc')} | {kg} | {r['train_seconds']:.0f} |")
        if "search_cost" in subp:
            notes.append(f"{r['row']} search cost: hierarchical search phase (warm-up + search) "
                         f"{r['search_phase_seconds']:.0f} s on this machine, of which the search "
                         f"itself {1e3 * r['search_cost_seconds']:.2f} ms; paper "
                         f"{subp['search_cost']}.")
    return "\n".join(lines + [""] + notes if notes else lines)


def _cell(group: list[dict]) -> str:
    """mean +- std of the sub-network accuracy over the seeds, [mean params], X for invalid."""
    valid = [r for r in group if r["subnetwork"] is not None]
    invalid = len(group) - len(valid)
    if not valid:
        return f"X ({invalid}/{len(group)} invalid)"
    accs = [100 * r["subnetwork"]["eval_accuracy"] for r in valid]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    params = statistics.mean(r["subnetwork"]["params"] for r in valid)
    text = f"{statistics.mean(accs):.2f} ± {std:.2f} [{params / 1e6:.3f}M]"
    return text + (f", X {invalid}/{len(group)}" if invalid else "")


def _paired(acc: dict, row: str, ref: str, col: str, seeds: list[int]) -> str:
    diffs = [acc[(row, col, s)] - acc[(ref, col, s)] for s in seeds
             if (row, col, s) in acc and (ref, col, s) in acc]
    return f"{statistics.mean(diffs):+.2f} (n={len(diffs)})" if diffs else ""


def _grid_table(records: list[dict]) -> str:
    """Rows x columns; each cell over the seeds. A paper row follows when the paper has one."""
    rows = list(dict.fromkeys(r["row"] for r in records))
    cols = list(dict.fromkeys(r["column"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    lines = [f"| sub-network top-1 (%), mean ± std over seeds {seeds} [params] | "
             + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells = [_cell([r for r in records if r["row"] == row and r["column"] == c])
                 for c in cols]
        lines.append(f"| {row} (ours) | " + " | ".join(cells) + " |")
        paper = {r["column"]: r["paper"].get("acc") for r in records if r["row"] == row}
        if any(paper.values()):
            lines.append(f"| {row} (paper) | " + " | ".join(str(paper.get(c) or "")
                                                           for c in cols) + " |")
    if len(rows) > 1:  # same seed, same column: the runs share data order and initialisation
        acc = {(r["row"], r["column"], r["seed"]): 100 * r["subnetwork"]["eval_accuracy"]
               for r in records if r["subnetwork"] is not None}
        for row in rows[1:]:
            lines.append(f"| {row} minus {rows[0]}, same seed | "
                         + " | ".join(_paired(acc, row, rows[0], c, seeds) for c in cols) + " |")
    full = [100 * r["full"]["eval_accuracy"] for r in records]
    early = sum(r.get("first_zero_step") is not None
                and r["first_zero_step"] < r["last_projection_step"] for r in records)
    median_train = statistics.median(r["train_seconds"] for r in records)
    lines.append("")
    lines.append(f"{len(records)} runs; {sum(not r['valid'] for r in records)} invalid zero sets; "
                 f"median H2SPG training {median_train:.0f} s per run; "
                 f"full network {_m(records[0]['full']['params'])}M params, "
                 f"{_m(records[0]['full']['macs'], 1)}M MACs, {records[0]['num_groups']} removal "
                 f"structures; full (H2SPG-trained) accuracy {min(full):.2f}-{max(full):.2f}%; "
                 f"runs in which a group reached zero before the last projection step (where "
                 f"the rest is zeroed at once): {early}/{len(records)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiments", nargs="+", help=f"{', '.join(EXPERIMENTS)} or all")
    p.add_argument("--smoke", action="store_true",
                   help="minutes on a CPU: narrow networks, few epochs, digits/synthetic data")
    p.add_argument("--data-dir", default=None, help="prepared TFDS datasets (full scale)")
    p.add_argument("--out", default="runs/experiments", help="where runs and tables go")
    p.add_argument("--rerun", action="store_true", help="run again even if a report exists")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    args = p.parse_args(argv)
    names = list(EXPERIMENTS) if args.experiments == ["all"] else args.experiments
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; choose from "
                f"{', '.join(EXPERIMENTS)} or all")

    import jax

    # Runs that differ only in seed compile the same programs: keep them across processes.
    jax.config.update("jax_compilation_cache_dir", str(Path(args.out) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    for name in names:
        run_experiment(name, smoke=args.smoke, data_dir=args.data_dir, out=Path(args.out),
                       rerun=args.rerun, verbose=not args.quiet)


if __name__ == "__main__":
    main()
