"""What `textinv eval` writes: metrics.json, the fidelity/editability trade-off plot and one
self-contained HTML report (every image inline)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .atomic import atomic_path, write_text
from .errors import TextinvError


def plot_tradeoff(result: dict, path) -> Path:
    """The paper's trade-off figure for one run: editability (x) against fidelity (y), one point per
    saved step, joined in step order; the recommended step starred, the init word marked ×."""
    try:
        import matplotlib  # deferred: the 'eval' extra, only for the trade-off plot
    except ImportError:
        raise TextinvError("the trade-off plot needs matplotlib: pip install 'textinv[eval]'") from None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # deferred: the 'eval' extra, only for the trade-off plot

    pts = [p for p in result["points"] if p["fidelity"] is not None and p["editability"] is not None]
    labels = result.get("labels", {})
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    if pts:
        xs, ys = [p["editability"] for p in pts], [p["fidelity"] for p in pts]
        steps = [p["step"] for p in pts]
        ax.plot(xs, ys, "-", color="0.7", zorder=1)
        sc = ax.scatter(xs, ys, c=steps, cmap="viridis", zorder=2)
        fig.colorbar(sc, ax=ax, label="training step")
        for x, y, s in zip(xs, ys, steps):
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        best = next((p for p in pts if p["step"] == result.get("best_step")), None)
        if best is not None:
            ax.scatter([best["editability"]], [best["fidelity"]], marker="*", s=260, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=3, label=f"recommended: step {best['step']}")
    base = result.get("baseline")
    if base and base["fidelity"] is not None and base["editability"] is not None:
        ax.scatter([base["editability"]], [base["fidelity"]], marker="x", color="black", s=60, zorder=3,
                   label=f"init word {base['init']!r}")
    from matplotlib.ticker import MaxNLocator  # deferred: the 'eval' extra, only for the trade-off plot

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(labels.get("editability", "editability"))
    ax.set_ylabel(labels.get("fidelity", "fidelity"))
    ax.set_title(f"{result['trigger']}: fidelity vs editability per step", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def table_rows(result: dict) -> list[list[str]]:
    """Header + one row per step (and the init word's baseline): what the CLI prints and the report shows."""
    dino = any("dino" in p for p in result["points"])
    head = ["step", "fidelity", "editability"] + (["DINO"] if dino else []) + ["score", ""]
    rows = [head]

    def cells(label, p, mark=""):
        return [label, _f(p["fidelity"]), _f(p["editability"])] + ([_f(p.get("dino"))] if dino else []) + [_f(p["score"]), mark]

    for p in result["points"]:
        rows.append(cells(str(p["step"]), p, "← recommended" if p["step"] == result.get("best_step") else ""))
    if result.get("baseline"):
        rows.append(cells(f"init {result['baseline']['init']!r}", result["baseline"]))
    return rows


def format_table(result: dict) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _f(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _imgs(pngs: list[bytes], size: int = 96) -> str:
    """Small pictures (the mini world's 32×32) enlarged with crisp pixels; larger ones smoothly."""
    out = []
    for b in pngs:
        w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")  # the PNG IHDR chunk
        style = "" if w < size else " style='image-rendering:auto'"
        out.append(f'<img src="{_uri(b)}" width="{size}" height="{max(1, round(size * h / max(w, 1)))}"{style}>')
    return "".join(out)


def html_report(evaluation, curve_png: bytes | None) -> str:
    """One self-contained HTML page: summary, curve, table, training images, per-prompt grids."""
    r, e = evaluation.result, html.escape
    m = r["metric"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>textinv eval: {e(r['trigger'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{image-rendering:pixelated;margin:1px;border:1px solid #ddd}"
        "table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.best{background:#fff3c4}code{background:#f4f4f4}</style>",
        "</head><body>",
        f"<h1>textinv eval — <code>{e(r['trigger'])}</code></h1>",
        f"<p>{e(r['target'])} · model <code>{e(r['model'])}</code> · training images {e(r['images'])} · "
        f"{r['n']} images per prompt, seed {r['seed']}, {r['sampling_steps']} sampling steps, guidance {r['guidance']}</p>",
        f"<p><b>Metrics ({e(m['backend'])})</b>: fidelity = {e(m['fidelity'])}; editability = {e(m['editability'])}"
        + (f"; DINO = {e(m['dino'])} (weights {e(str(m['dino_weights']))}); CLIP weights {e(str(m['clip_weights']))}"
           if m.get("dino_weights") else "")
        + (f". Averaging: {e(m['averaging'])}" if m.get("averaging") else "") + ".</p>",
    ]
    if r.get("best_step") is not None:
        parts.append(f"<p><b>Recommended step: {r['best_step']}</b> — {e(r['rule'])}.</p>")
    if curve_png:
        parts.append(f'<h2>Trade-off</h2><img src="{_uri(curve_png)}" style="image-rendering:auto;border:none">')
    rows = table_rows(r)
    parts.append("<h2>Per step</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
    for row in rows[1:]:
        cls = " class='best'" if row[-1] else ""
        parts.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    parts.append(f"<h2>Training images ({len(evaluation.training)})</h2><p>{_imgs(evaluation.training)}</p>")
    shown = []
    if r.get("best_step") is not None:
        shown.append((r["best_step"], f"recommended step {r['best_step']}"))
    if r["points"] and r["points"][-1]["step"] != r.get("best_step"):
        shown.append((r["points"][-1]["step"], f"last step {r['points'][-1]['step']}"))
    if "baseline" in evaluation.thumbs:
        shown.append(("baseline", f"init word {r['baseline']['init']!r} (baseline)"))
    for key, title in shown:
        parts.append(f"<h2>Samples: {e(title)}</h2><table>")
        for prompt, pngs in evaluation.thumbs.get(key, {}).items():
            parts.append(f"<tr><td>{e(prompt)}</td><td style='text-align:left'>{_imgs(pngs)}</td></tr>")
        parts.append("</table>")
    parts.append("<p style='color:#888'>written by textinv eval; metrics.json beside this file holds every number.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(evaluation, out) -> dict[str, Path]:
    """metrics.json, curve.png and report.html in ``out`` (each written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "curve": out / "curve.png", "report": out / "report.html"}
    write_text(paths["metrics"], json.dumps(evaluation.result, indent=2))
    plot_tradeoff(evaluation.result, paths["curve"])
    write_text(paths["report"], html_report(evaluation, paths["curve"].read_bytes()))
    return paths
