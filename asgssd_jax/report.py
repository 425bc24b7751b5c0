"""The run directory's pictures, plots and Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asgssd_jax import viz
from asgssd_jax.trace import trace

__all__ = ["draw_subnetwork", "plot_history", "write_all", "write_markdown"]


def write_all(report: dict[str, Any], space, sub, out: Path, sample) -> list[Path]:
    """Pictures (SVG), plots (PNG) and report.md for a finished run."""
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


def plot_history(report: dict[str, Any], out: Path) -> list[Path]:
    """loss_accuracy.png and group_sparsity.png (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    hist = report["history"]
    files = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in hist["steps"]]
    ax1.plot(steps, [r["loss"] for r in hist["steps"]], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    epochs = [r["epoch"] for r in hist["epochs"]]
    ax2.plot(epochs, [r.get("eval_accuracy", float("nan")) for r in hist["epochs"]], "o-",
             label=f"{report['config'].get('optimizer', 'h2spg')} (full network)")
    if report.get("baseline"):
        ax2.plot(epochs, [r["eval_accuracy"] for r in report["baseline"]["history"]], "s--",
                 label="base optimizer only")
    if report.get("subnetwork"):
        ax2.axhline(report["subnetwork"]["eval_accuracy"], color="tab:green", ls=":",
                    label="sub-network")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy")
    files.append(_save_figure(plt, fig, ax2, out / "loss_accuracy.png"))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    sp = hist["sparsity"]
    ax.step([r["step"] for r in sp], [r["zero_groups"] for r in sp], where="post",
            label="zero groups")
    ax.step([r["step"] for r in sp], [r["redundant"] for r in sp], where="post", ls="--",
            label="redundant (G_r)")
    ax.axhline(report["search_space"]["K"], color="grey", ls=":", label="K")
    ax.set_xlabel("step")
    ax.set_ylabel("groups")
    ax.set_title(f"group sparsity ({report['search_space']['num_groups']} removal structures)")
    files.append(_save_figure(plt, fig, ax, out / "group_sparsity.png"))
    return files


def _save_figure(plt, fig, ax, path: Path) -> Path:
    """Grid and legend on ``ax``, then ``fig`` saved to ``path`` and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _m(x: float) -> str:
    return f"{x / 1e6:.3f}M"


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    """report.md: the run's figures in tables, with links to the pictures."""
    full, sub = report["full"], report["subnetwork"]
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
        "| | params | MACs | test accuracy |",
        "|---|---|---|---|",
        f"| full network ({opt}-trained) | {_m(full['params'])} | {_m(full['macs'])} | "
        f"{full['eval_accuracy']:.4f} |",
    ]
    if sub is None:
        lines.append("| sub-network | invalid: the zero groups cut the network | | |")
        sub = {"params": 0, "macs": 0, "relative_difference_to_zeroed_full": float("nan"),
               "construction_seconds": 0.0, "checkpoint": "-", "export": "-"}
    else:
        lines.append(f"| sub-network | {_m(sub['params'])} | {_m(sub['macs'])} | "
                     f"{sub['eval_accuracy']:.4f} |")
    if report.get("baseline"):
        lines.append(f"| full network, base optimizer only | {_m(full['params'])} | "
                     f"{_m(full['macs'])} | {report['baseline']['eval_accuracy']:.4f} |")
    if report.get("finetune"):
        lines.append(f"| sub-network, fine-tuned | {_m(sub['params'])} | {_m(sub['macs'])} | "
                     f"{report['finetune']['eval_accuracy']:.4f} |")
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
        "![trace graph](trace_graph.svg) ![segment graph](segment_graph.svg)",
        "![redundant structures](redundant_structures.svg) ![sub-network](subnetwork.svg)",
        "",
        "![loss and accuracy](loss_accuracy.png) ![group sparsity](group_sparsity.png)",
        "",
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
