"""The run directory's pictures, plots and Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asgssd_jax import tasks, viz
from asgssd_jax.trace import trace

__all__ = ["PICTURES", "draw_subnetwork", "plot_history", "redraw", "write_all",
           "write_markdown"]

#: The run directory's pictures, in report.md's order: file name and caption.
PICTURES = [("trace_graph.svg", "trace graph"), ("segment_graph.svg", "segment graph"),
            ("redundant_structures.svg", "redundant structures"),
            ("subnetwork.svg", "sub-network"), ("loss_accuracy.png", "loss and accuracy"),
            ("group_sparsity.png", "group sparsity")]


def write_all(report: dict[str, Any], space, sub, out: Path, sample) -> list[Path]:
    """Pictures (SVG, with their DOT sources), plots (PNG) and report.md for a finished run."""
    name = report["model"]
    zero = report["zero_groups"]
    files = [
        viz.save(viz.draw_trace_graph(space, title=f"{name}: trace graph"),
                 out / "trace_graph.svg"),
        viz.save(viz.draw_segment_graph(space, title=f"{name}: segment graph and removal "
                                        "structures"), out / "segment_graph.svg"),
        viz.save(viz.draw_segment_graph(space, redundant=zero,
                                        title=f"{name}: redundant structures (grey, dashed)"),
                 out / "redundant_structures.svg"),
    ]
    if sub is not None:
        files.append(draw_subnetwork(sub, sample, name, out / "subnetwork.svg"))
    files += plot_history(report, out)
    files.append(write_markdown(report, out))
    return files


def draw_subnetwork(sub, sample, name: str, path: Path) -> Path:
    """The sub-network's trace graph, traced on ``sample``, saved to ``path`` (SVG)."""
    return viz.save(viz.draw_trace_graph(trace(sub.apply, sub.variables, sample, train=False),
                                         title=f"{name}: sub-network"), path)


def redraw(report: dict[str, Any], out: Path) -> list[Path]:
    """Every picture of a run directory again, from the DOT files beside them (with Graphviz's
    ``dot`` when installed, else matplotlib), the plots from ``report``, then report.md."""
    files = [viz.render(dot) for dot in sorted(out.glob("*.dot"))]
    files = [f for f in files if f is not None]
    return files + plot_history(report, out) + [write_markdown(report, out)]


def _task(report: dict[str, Any]) -> tasks.Task:
    """The run's task (runs written before report.json named it were classifications)."""
    return tasks.get(report.get("task", {}).get("name", tasks.CLASSIFICATION.name))


def plot_history(report: dict[str, Any], out: Path) -> list[Path]:
    """loss_accuracy.png and group_sparsity.png, with H2SPG's phases shaded: warm-up, the
    hierarchical search at its end, projection (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # pragma: no cover
        return []
    hist = report["history"]
    phases = _phases(report)
    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in hist["steps"]]
    ax1.plot(steps, [r["loss"] for r in hist["steps"]], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    _mark_phases(ax1, phases, 1)
    epochs = [r["epoch"] for r in hist["epochs"]]
    headline = _task(report).metrics[0]  # test accuracy, or validation loss
    key = f"eval_{headline.key}"
    ax2.plot(epochs, [r.get(key, float("nan")) for r in hist["epochs"]], "o-",
             label=f"{report['config'].get('optimizer', 'h2spg')} (full network)")
    if report.get("baseline"):
        ax2.plot(epochs, [r[key] for r in report["baseline"]["history"]], "s--",
                 label="base optimizer only")
    if report.get("subnetwork"):
        ax2.axhline(report["subnetwork"][key], color="tab:green", ls=":",
                    label="sub-network")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(headline.label)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    _mark_phases(ax2, phases, phases["steps_per_epoch"], labels=True)
    files.append(_save_figure(plt, fig, ax2, out / "loss_accuracy.png"))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    sp = hist["sparsity"]
    ax.step([r["step"] for r in sp], [r["zero_groups"] for r in sp], where="post",
            label="zero groups")
    ax.step([r["step"] for r in sp], [r["redundant"] for r in sp], where="post", ls="--",
            label="redundant (G_r)")
    ax.axhline(report["search_space"]["K"], color="grey", ls=":", label="K")
    for by, marker in (("test", "o"), ("safeguard", "x")):
        z = sorted(r["step"] for r in report.get("zeroing", []) if r["by"] == by)
        if z:
            ax.plot(z, [sum(r["step"] <= s for r in report["zeroing"]) for s in z], marker,
                    ls="none", label=f"zeroed by the {'half-space test' if by == 'test' else by}")
    ax.set_xlabel("step")
    ax.set_ylabel("groups")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.3, report["search_space"]["K"] + 0.5)
    _mark_phases(ax, phases, 1, labels=True)
    ax.set_title(f"group sparsity ({report['search_space']['num_groups']} removal structures)")
    files.append(_save_figure(plt, fig, ax, out / "group_sparsity.png"))
    return files


def _phases(report: dict[str, Any]) -> dict[str, int]:
    """Steps per epoch and H2SPG's warm-up and projection steps of a run (from its config
    for runs written before report.json recorded them)."""
    if report.get("phases"):
        return report["phases"]
    cfg, hist = report["config"], report["history"]
    spe = max(len(hist["steps"]) // max(len(hist["epochs"]), 1), 1)
    return {"steps_per_epoch": spe, "warmup_steps": cfg["warmup_epochs"] * spe,
            "projection_steps": cfg["projection_epochs"] * spe,
            "total_steps": cfg["epochs"] * spe}


def _mark_phases(ax, phases: dict[str, int], per_unit: int, labels: bool = False) -> None:
    """Warm-up and projection shaded, the hierarchical search a line between them; the x axis
    counts ``per_unit`` steps a unit (1: steps; steps per epoch: epochs, which end at 1, 2...)."""
    w = phases["warmup_steps"] / per_unit
    p = (phases["warmup_steps"] + phases["projection_steps"]) / per_unit
    ax.axvspan(0, w, color="tab:blue", alpha=0.08, lw=0,
               label="warm-up" if labels else None)
    ax.axvline(w, color="tab:red", lw=0.9, label="hierarchical search" if labels else None)
    ax.axvspan(w, p, color="tab:orange", alpha=0.12, lw=0,
               label="projection" if labels else None)


def _save_figure(plt, fig, ax, path: Path) -> Path:
    """Grid and legend on ``ax``, then ``fig`` saved to ``path`` and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _zeroing_line(zeroing: list[dict[str, Any]]) -> str:
    """When and how each group became zero: the half-space test, or the last projection
    step's safeguard, with its norm then relative to its norm at the search."""
    return "Zeroed: " + "; ".join(
        f"g{r['group']} at step {r['step']} by the "
        f"{'half-space test' if r['by'] == 'test' else 'safeguard (last projection step)'} "
        f"(norm {r['relative_norm']:.3f} of its norm at the search)"
        for r in sorted(zeroing, key=lambda r: (r["step"], r["group"]))) + "."


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}M"


def _picture_lines(out: Path) -> list[str]:
    """Links to the pictures that exist (never to a missing file), and what to do about the
    missing ones."""
    present = [(f, c) for f, c in PICTURES if (out / f).exists()]
    lines = [" ".join(f"![{c}]({f})" for f, c in present[k:k + 2])
             for k in range(0, len(present), 2)]
    missing = [f for f, _ in PICTURES if not (out / f).exists()
               and (f.endswith(".png") or (out / f).with_suffix(".dot").exists())]
    if missing:
        lines.append(f"Not drawn: {', '.join(missing)} (the graphs' .dot sources are here). "
                     "Pictures "
                     "need matplotlib (`pip install matplotlib`) or Graphviz's `dot`; then "
                     "`asgssd report` on this directory draws them.")
    return [line for text in lines for line in (text, "")]


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    """report.md: the run's figures in tables, with links to the pictures."""
    full, sub = report["full"], report["subnetwork"]
    metrics = _task(report).metrics

    def row(name: str, params: float, macs: float, figures: dict[str, Any]) -> str:
        return f"| {name} | {_m(params)} | {_m(macs)} | " + " | ".join(
            f"{figures[f'eval_{m.key}']:.4f}" for m in metrics) + " |"

    ss = report["search_space"]
    opt = {"h2spg": "H2SPG", "dhspg": "DHSPG", "proxsg_plus": "ProxSG+"}[
        report["config"].get("optimizer", "h2spg")]
    lines = [
        f"# {report['model']} on {report['dataset']}",
        "",
        f"Target group sparsity {report['config']['target_sparsity']} of {ss['num_groups']} "
        f"removal structures: K = {ss['K']}; zero groups after {opt}: "
        f"{', '.join(f'g{i}' for i in report['zero_groups']) or 'none'}.",
        "",
        *([_zeroing_line(report["zeroing"]), ""] if report.get("zeroing") else []),
        "| | params | MACs | " + " | ".join(m.label for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
        row(f"full network ({opt}-trained)", full["params"], full["macs"], full),
    ]
    if sub is None:
        lines.append("| sub-network | invalid: the zero groups cut the network | |"
                     + " |" * len(metrics))
        sub = {"params": 0, "macs": 0, "relative_difference_to_zeroed_full": float("nan"),
               "construction_seconds": 0.0, "checkpoint": "-", "export": "-"}
    else:
        lines.append(row("sub-network", sub["params"], sub["macs"], sub))
    if report.get("baseline"):
        lines.append(row("full network, base optimizer only", full["params"], full["macs"],
                         report["baseline"]))
    if report.get("finetune"):
        lines.append(row("sub-network, fine-tuned", sub["params"], sub["macs"],
                         report["finetune"]))
    search = report.get("search_cost_seconds")
    lines += [
        "",
        f"- sub-network vs zeroed full network: relative difference "
        f"{sub['relative_difference_to_zeroed_full']:.1e}",
        f"- search space generated in {ss['generation_seconds']:.2f} s; sub-network built in "
        f"{sub['construction_seconds']:.2f} s; training took {report['train_seconds']:.1f} s"
        + (f"; hierarchical search (search cost) {search * 1e3:.2f} ms" if search else ""),
        f"- checkpoint: `{Path(sub['checkpoint']).name}`; export: "
        + (f"`{Path(sub['export']).name}`" if sub["export"]
           else f"failed ({report.get('export_error')})"),
        "",
        *_picture_lines(out),
        "| group | params | MACs | removed |",
        "|---|---|---|---|",
    ]
    zero = set(report["zero_groups"])
    for g in ss["groups"]:
        lines.append(f"| g{g['index']} | {g['params']:,} | {_m(g['macs'])} | "
                     f"{'yes' if g['index'] in zero else ''} |")
    v = report["versions"]
    lines += ["", f"jax {v['jax']}, flax {v['flax']}, optax {v['optax']} on {v['device']} "
              f"x{v['devices']}."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
