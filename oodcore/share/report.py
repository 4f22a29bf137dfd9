"""`oodcore report`: a static, offline report of a benchmark (index.html + figures as PNG, SVG and CSV).

Everything is local files: no script, no CDN, no font download; the figures are images rendered by
vl-convert (oodcore.share.figures) and the tables are plain HTML.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

import oodcore
from oodcore import detectors as M
from oodcore.evaluation.analysis import odin_auroc_grid, report_frame, softmax_confidence
from oodcore.evaluation.metrics import METRIC_LABELS, METRIC_NAMES, roc_points
from oodcore.share import figures as F
from oodcore.share.scoring import Progress, run_report
from oodcore.store import cache as C
from oodcore.store.rundata import BenchmarkData
from oodcore.store.thumbs import unpack_one

N_MISFIRES = 8
ROC_METHODS = 5
CONVENTIONS = (
    "OOD is the positive class and a higher score means more OOD. AUROC and AUPR-Out treat OOD as positive, "
    "AUPR-In treats ID as positive. FPR@95 (OOD+) is the ID false-positive rate when 95% of OOD images are caught "
    "(the study's convention); FPR@95 (ID+) is the OOD acceptance when 95% of ID images are kept. Brackets hold "
    "95% stratified-bootstrap confidence intervals."
)


def _roc_frame(data: BenchmarkData, report: dict) -> pd.DataFrame:
    """MSP plus the best default-setting methods by AUROC (trained detectors on their held-out rows)."""
    from oodcore.evaluation.report import eval_scores

    untuned = [r for r in report["results"] if not r["tuned_on"] or r.get("trained_on_ood")]
    best = sorted(untuned, key=lambda r: -r["auroc"])
    chosen = [r for r in untuned if r["method"] == "msp"][:1]
    chosen += [r for r in best if r not in chosen][: ROC_METHODS - len(chosen)]
    frames = []
    for r in chosen:
        s_id, s_ood, _ = eval_scores(M.get_for(data, r["method"]), data)
        roc = roc_points(s_id, s_ood, max_points=300)
        label = f"{r['label']} (AUROC {100 * r['auroc']:.1f}%)"
        frames.append(pd.DataFrame({"curve": label, "fpr": roc["fpr"], "tpr": roc["tpr"]}))
    return pd.concat(frames, ignore_index=True)


def _misfires(root: Path, data: BenchmarkData, folder: Path) -> pd.DataFrame:
    """The OOD images MSP is surest are ID (lowest scores), with predicted class and confidence; thumbnails saved."""
    s_ood = M.get("msp").score(data, data.ood)
    order = np.argsort(s_ood, kind="stable")[:N_MISFIRES]
    conf = softmax_confidence(np.asarray(data.ood.logits[order], dtype=np.float64))
    try:
        thumbs = C.load_thumbnails(root, data.benchmark, data.arch, "ood")
    except (KeyError, OSError, ValueError):
        thumbs = None
    rows = []
    for rank, (i, c) in enumerate(zip(order, conf), 1):
        image = ""
        if thumbs is not None:
            image = f"img/{C.safe_name(data.arch)}-{rank}.jpg"
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            unpack_one(thumbs[0], thumbs[1], int(i)).save(folder / image, "JPEG", quality=90)
        rows.append(
            {
                "architecture": data.arch,
                "rank": rank,
                "path": str(data.ood.paths[i]),
                "predicted": data.class_names[int(data.ood.preds[i])],
                "confidence (%)": round(100 * float(c), 1),
                "msp_score": float(s_ood[i]),
                "image": image,
            }
        )
    return pd.DataFrame(rows)


def _table_html(frame: pd.DataFrame) -> str:
    cells = []
    head = ["Architecture", "Method", "Setting"] + [METRIC_LABELS[k] for k in METRIC_NAMES] + ["Tuned with OOD data"]
    cells.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for _, r in frame.iterrows():
        metric_cells = []
        for k in METRIC_NAMES:
            ci = f" [{r[f'{k}_lo']:.1f}, {r[f'{k}_hi']:.1f}]" if np.isfinite(r[f"{k}_lo"]) else ""
            metric_cells.append(f"<td class=num>{r[k]:.1f}<small>{ci}</small></td>")
        cells.append(
            f"<tr><td>{html.escape(str(r['architecture']))}</td><td>{html.escape(str(r['method']))}</td>"
            f"<td>{html.escape(str(r['setting']))}</td>"
            + "".join(metric_cells)
            + f"<td>{html.escape(str(r['tuned with OOD data']))}</td></tr>"
        )
    return "<table>" + "".join(cells) + "</table>"


def _gallery(mis: pd.DataFrame) -> str:
    e = html.escape
    out = ""
    for arch, part in mis.groupby("architecture", sort=False) if len(mis) else []:
        items = ""
        for _, r in part.iterrows():
            img = f'<img src="{e(r["image"])}" alt="OOD image {r["rank"]}">' if r["image"] else ""
            caption = f"#{r['rank']} predicted <b>{e(str(r['predicted']))}</b> ({r['confidence (%)']:.0f}%)"
            items += f"<figure>{img}<figcaption>{caption}</figcaption></figure>"
        out += f"<h3>{e(str(arch))}</h3><div class=grid>{items}</div>"
    return out


def _figure_html(title: str, files: dict) -> str:
    links = " · ".join(f'<a href="figures/{files[k]}">{k.upper()}</a>' for k in ("png", "svg", "csv"))
    return (
        f'<figure><img src="figures/{files["svg"]}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)} · {links}</figcaption></figure>"
    )


STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:13px;margin:1rem 0}th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}
td.num{text-align:right;white-space:nowrap}small{color:#666}figure{margin:1.5rem 0}figure img{max-width:100%}
figcaption{font-size:13px;color:#555}.grid{display:flex;flex-wrap:wrap;gap:10px}.grid figure{margin:0;width:128px}
.grid img{width:128px;height:128px;object-fit:cover;image-rendering:pixelated}.note{background:#f4f6fa;padding:.6rem 1rem;border-left:3px solid #3574C4}"""


def make_report(
    root: Path,
    benchmark: str,
    archs: list[str] | None,
    out: Path,
    *,
    n_boot: int = 200,
    progress: Progress | None = None,
) -> dict:
    """Write `out`/index.html, `out`/figures/*.{png,svg,csv}, `out`/img/*.jpg; returns {"index", "figures"}."""
    root, out = Path(root), Path(out)
    archs = C.benchmark_archs(root, benchmark, archs)
    for sub in ("figures", "img"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    reports, rocs, grids, misfires = [], {}, {}, []
    steps = len(archs) + 2
    for i, arch in enumerate(archs):
        if progress:
            progress(f"scoring {arch} ({i + 1}/{len(archs)})", i / steps)
        data = C.load_benchmark(root, benchmark, arch)
        reports.append(run_report(data, n_boot))
        rocs[arch] = _roc_frame(data, reports[-1])
        if data.odin is not None:
            grids[arch] = odin_auroc_grid(data)
        misfires.append(_misfires(root, data, out))
    frame = report_frame(reports)
    if progress:
        progress("rendering figures", len(archs) / steps)
    figs = []
    for metric in ("auroc", "aupr_out", "fpr95"):
        cols = ["architecture", "method", "setting", metric, f"{metric}_lo", f"{metric}_hi"]
        figs.append(
            (F.METRIC_TITLES[metric], F.render(F.metric_bars(frame, metric), out / "figures", metric, frame[cols]))
        )
    cols = ["architecture", "method", "setting", "ID top-1 (%)", "auroc"]
    figs.append(("ID top-1 vs AUROC", F.render(F.top1_vs_auroc(frame), out / "figures", "top1_vs_auroc", frame[cols])))
    for arch, grid in grids.items():
        stem = f"odin_grid-{C.safe_name(arch)}"
        figs.append((f"ODIN T × ε · {arch}", F.render(F.odin_heatmap(grid, arch), out / "figures", stem, grid)))
    for arch, curves in rocs.items():
        stem = f"roc-{C.safe_name(arch)}"
        figs.append((f"ROC · {arch}", F.render(F.roc_overlay(curves, arch), out / "figures", stem, curves)))
    frame.to_csv(out / "figures" / "leaderboard.csv", index=False)
    mis = pd.concat(misfires, ignore_index=True) if misfires else pd.DataFrame()
    mis.to_csv(out / "figures" / "misfires.csv", index=False)
    index = out / "index.html"
    index.write_text(_page(benchmark, reports, frame, figs, mis, n_boot))
    if progress:
        progress("report written", 1.0)
    return {"index": str(index), "figures": len(figs)}


def _page(benchmark: str, reports: list[dict], frame: pd.DataFrame, figs: list, mis: pd.DataFrame, n_boot: int) -> str:
    e = html.escape
    protocol = ", ".join(sorted({r["protocol"] for r in reports}))
    runs = "".join(
        f"<tr><td>{e(r['arch'])}</td><td class=num>{r['n_id']:,}</td><td class=num>{r['n_ood']:,}</td>"
        f"<td class=num>{r['n_classes']}</td><td class=num>{100 * r['id_top1']:.1f}</td></tr>"
        for r in reports
    )
    tuned = frame[frame["tuned on"] != ""]
    tuned_text = (
        "Rows marked (tuned) or (trained) chose their setting on, or were trained with, the OOD <b>exposure</b> split "
        f"and are scored on the <b>held-out</b> split only ({e(str(tuned['tuned with OOD data'].iloc[0]))}): "
        + ", ".join(sorted({e(str(m)) for m in tuned["method"]}))
        + ". Every other row is scored on the full OOD set."
        if len(tuned)
        else "No row was tuned or trained with OOD data; every row is scored on the full OOD set."
    )
    unavailable = [f"{u['label']} on {r['arch']}: {u['why']}" for r in reports for u in r.get("unavailable", [])]
    gallery = _gallery(mis)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>oodcore report · {e(benchmark)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>
<h1>OOD detection report · {e(benchmark)}</h1>
<p>Protocol: <b>{e(protocol)}</b>. Made by <code>oodcore report</code> (oodcore {e(oodcore.__version__)}) on
{e(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))}; {n_boot} bootstrap replicates per CI.</p>
<table><tr><th>Architecture</th><th>n ID</th><th>n OOD</th><th>classes</th><th>ID top-1 (%)</th></tr>{runs}</table>
<p class=note>{e(CONVENTIONS)}</p>
<h2>Leaderboard</h2><p class=note>{tuned_text}</p>
<p>Metrics in percent · <a href="figures/leaderboard.csv">CSV</a></p>
{_table_html(frame)}
{"<p>Not scored: " + "; ".join(e(u) for u in unavailable) + "</p>" if unavailable else ""}
<h2>Figures</h2>
{"".join(_figure_html(title, files) for title, files in figs)}
<h2>Misfires</h2>
<p>The {N_MISFIRES} OOD images each architecture's MSP baseline is surest are in-distribution, with the predicted
class and softmax confidence · <a href="figures/misfires.csv">CSV</a></p>
{gallery}
</body></html>
"""
