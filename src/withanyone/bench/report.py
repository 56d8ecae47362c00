"""Reports from ``results.jsonl``: ``summary.json``, ``report.md`` and one self-contained ``report.html``.

The leaderboard per subset (p1 / p2 / p3 / all) × face model (plus their average when several) × method
gives mean, robust mean and a 95 % bootstrap interval per metric. Plots (matplotlib, also saved as PNG) and
gallery thumbnails are embedded as base64; every prompt, id and file name is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .metrics import aggregate
from .runner import RUN_CONFIG, current_results
from .samples import SUBSETS

#: Metrics in the leaderboard, in order, with their labels.
METRICS = {
    "sim_gt": "Sim(GT)", "sim_ref": "Sim(Ref)", "cp": "CP (gated)", "cp_all": "CP (all)",
    "sim_ref_unmatched": "Sim(Ref) unmatched", "count_acc": "Count acc.", "identity_confusion": "ID confusion",
    "clip_i": "CLIP-I", "clip_t": "CLIP-T", "aesthetic": "Aesthetic",
}
#: Published single-person points (Sim(GT), CP) from the paper (insightface buffalo_l), for context only.
PAPER_POINTS = {"WithAnyone": (0.460, 0.144), "InstantID": (0.464, 0.337), "PuLID": (0.452, 0.315),
                "UMO": (0.458, 0.359), "UniPortrait": (0.447, 0.265), "reference-as-output": (0.521, 1.0)}
#: Published multi-person points (Sim(GT), CP): WithAnyone on two persons and on three–four persons.
PAPER_POINTS_MULTI = {"p2": {"WithAnyone": (0.405, 0.161)}, "p3": {"WithAnyone": (0.414, 0.171)}}
IMAGE_METRICS = ("clip_i", "clip_t", "aesthetic")
#: Labels of metrics that appear only in notes.
NOTE_LABELS = {"fid": "FID"}


def _value(row: dict[str, Any], metric: str) -> float | None:
    if metric == "cp":
        return row.get("cp") if row.get("cp_gate_pass") else None
    if metric == "cp_all":
        return row.get("cp")
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _average_rows(rows: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """Per (sample, method), the mean of each metric over the face models that have it; CP counts as gated
    in only when every face model's gate passes."""
    by: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[(r["sample"], r["method"])][r["face_model"]] = r
    out = []
    for (sample, method), per in sorted(by.items()):
        if set(per) != set(models):
            continue
        first = next(iter(per.values()))
        avg = {"sample": sample, "method": method, "face_model": "average", "subset": first["subset"],
               "status": "ok" if all(r["status"] == "ok" for r in per.values()) else "failed"}
        for m in ("sim_gt", "sim_ref", "sim_ref_unmatched", "sim_gt_unmatched") + IMAGE_METRICS:
            vals = [_value(r, m) for r in per.values()]
            avg[m] = float(np.mean(vals)) if vals and all(v is not None for v in vals) else None
        cps = [r.get("cp") for r in per.values()]
        avg["cp"] = float(np.mean(cps)) if all(c is not None for c in cps) else None
        avg["cp_gate_pass"] = all(bool(r.get("cp_gate_pass")) for r in per.values())
        out.append(avg)
    return out


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Aggregate ``<out>/results.jsonl`` into the summary dict (also what ``summary.json`` holds)."""
    out_dir = Path(out_dir)
    rows, stale_rows = current_results(out_dir)
    cfg_path = out_dir / RUN_CONFIG
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    models = sorted({r["face_model"] for r in rows}, key=lambda m: [f["name"] for f in
                                                                  cfg.get("face_models", [])].index(m)
                    if m in [f["name"] for f in cfg.get("face_models", [])] else 99)
    methods = list(dict.fromkeys(cfg.get("methods", []) + sorted({r["method"] for r in rows})))
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    all_rows = rows + (_average_rows(rows, models) if len(models) > 1 else [])
    model_names = models + (["average"] if len(models) > 1 else [])
    subsets = [s for s in SUBSETS if any(r["subset"] == s for r in rows)] + ["all"]
    board: dict[str, Any] = {}
    for sub in subsets:
        board[sub] = {}
        for fm in model_names:
            board[sub][fm] = {}
            for meth in methods:
                sel = [r for r in all_rows if r["face_model"] == fm and r["method"] == meth
                       and (sub == "all" or r["subset"] == sub)]
                entry: dict[str, Any] = {"samples": len(sel), "failed": sum(r["status"] != "ok" for r in sel)}
                for metric in METRICS:
                    vals = [v for r in sel if (r["status"] == "ok" or metric == "count_acc")
                            and (v := _value(r, metric)) is not None]
                    entry[metric] = aggregate(vals).to_dict() if vals else None
                entry["cp_gated_out"] = sum(1 for r in sel if r.get("cp") is not None and not r.get("cp_gate_pass"))
                board[sub][fm][meth] = entry
    failures = [{"sample": r["sample"], "method": r["method"], "face_model": r["face_model"], "reason": r["reason"]}
                for r in rows if r["status"] != "ok"]
    issues = [{"sample": r["sample"], "method": r["method"], "face_model": r["face_model"], "issue": i}
              for r in rows for i in r.get("issues", [])]
    reasons: dict[str, int] = defaultdict(int)
    for f in failures:
        reasons[_reason_kind(f["reason"])] += 1
    for i in issues:
        reasons[_reason_kind(i["issue"])] += 1
    not_computed = {}
    for name, why in (cfg.get("image_metrics") or {}).items():
        if why:
            for m in {"clip": ("clip_i", "clip_t")}.get(name, (name,)):
                not_computed[m] = f"not computed: {why}"
    hint = {"clip_i": "no CLIP model configured (--clip)", "clip_t": "no CLIP model configured (--clip)",
            "aesthetic": "no aesthetic predictor configured (--aesthetic SIGLIP::HEAD.safetensors)"}
    configured = set(cfg.get("image_metrics") or {})
    for m in IMAGE_METRICS:
        if not any(r.get(m) is not None for r in rows) and m not in not_computed:
            owner = "clip" if m.startswith("clip") else m
            not_computed[m] = "not computed: " + (hint[m] if owner not in configured else "no value produced")
    fid_path = out_dir / "fid.json"
    fid = json.loads(fid_path.read_text()) if fid_path.is_file() else None
    if fid is None:
        why = (cfg.get("image_metrics") or {}).get("clip")
        not_computed["fid"] = ("not computed: Fréchet distance uses CLIP image features (Inception-v3 FID weights "
                               "are not loadable offline) and " + (f"CLIP weights were missing: {why}" if why
                                                                   else "no CLIP model was configured"))
    stale = [{"sample": r["sample"], "method": r["method"], "face_model": r["face_model"], "why": r["stale"]}
             for r in stale_rows]
    stale_by_method: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in stale:
        for w in r["why"]:
            stale_by_method[r["method"]][w] += 1
    from .taxonomy import taxonomy_summary

    taxonomy = taxonomy_summary(rows, cfg.get("face_models", []), methods, cfg.get("benchmark"))
    return {
        "taxonomy": taxonomy,
        "stale": stale, "stale_methods": {m: dict(v) for m, v in stale_by_method.items()},
        "fid": fid,
        "benchmark": cfg.get("benchmark"), "face_models": cfg.get("face_models", []), "methods": methods,
        "subsets": subsets, "rows": len(rows), "sample_ids": sorted({r["sample"] for r in rows}), "leaderboard": board, "failures": failures, "issues": issues,
        "problem_counts": dict(sorted(reasons.items())), "not_computed": not_computed,
        "extra": cfg.get("extra", {}), "cp_normalisation": cfg.get("cp_normalisation", "exact"), "gates": {f["name"]: f["gate"] for f in cfg.get("face_models", [])},
        "multihuman": _multihuman_summary(rows, not_computed, models),
    }


def _multihuman_summary(rows: list[dict[str, Any]], not_computed: dict[str, str], models: list[str]):
    """The MultiHuman-Testbench table data (None without such rows); see ``multihuman.summarize_multihuman``."""
    from .multihuman import summarize_multihuman

    return summarize_multihuman(rows, not_computed, models)


def _reason_kind(text: str | None) -> str:
    t = (text or "").lower()
    for key, kind in (("meta.json", "malformed meta.json"), ("no output", "missing output"), ("no such file", "missing file"),
                      ("unreadable", "unreadable image"), ("no face in output", "no face in output"),
                      ("no face in gt", "no face in GT"), ("has no face", "reference without face"),
                      ("face-count mismatch", "face-count mismatch"), ("no gt", "no GT image"),
                      ("nothing to compare", "nothing to compare with")):
        if key in t:
            return kind
    return "other"


# --------------------------------------------------------------------------------------------------- plots


def _fmt(v: dict | None, key: str = "mean", digits: int = 3) -> str:
    if not v or v.get(key) is None:
        return "–"
    return f"{v[key]:.{digits}f}"


def tradeoff_plot(summary: dict[str, Any], face_model: str, paper_points: bool = False) -> bytes:
    """PNG: Sim(GT) (x) against CP (y) per subset, methods as points with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subs = [s for s in summary["subsets"] if s != "all"] or ["all"]
    fig, axes = plt.subplots(1, len(subs), figsize=(4.6 * len(subs), 4.0), squeeze=False)
    for ax, sub in zip(axes[0], subs, strict=False):
        board = summary["leaderboard"][sub].get(face_model, {})
        for k, (meth, e) in enumerate(board.items()):
            sg, cp, gated = e.get("sim_gt"), e.get("cp"), True
            if not cp:  # every sample gated out: show the ungated CP, hollow and labelled so
                cp, gated = e.get("cp_all"), False
            if not sg or not cp or sg.get("mean") is None or cp.get("mean") is None:
                continue
            x, y = sg["mean"], cp["mean"]
            ax.errorbar(x, y, xerr=[[x - sg["ci_low"]], [sg["ci_high"] - x]],
                        yerr=[[y - cp["ci_low"]], [cp["ci_high"] - y]], fmt="o", color=f"C{k % 10}",
                        mfc=f"C{k % 10}" if gated else "white", capsize=3, label=meth)
            ax.annotate(meth if gated else f"{meth} (ungated)", (x, y), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        pts = PAPER_POINTS if sub == "p1" else PAPER_POINTS_MULTI.get(sub, {})
        if paper_points and pts:
            xs, ys = zip(*pts.values(), strict=False)
            ax.scatter(xs, ys, marker="x", color="grey", label="published (paper, buffalo_l)")
            for name, (x, y) in pts.items():
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="grey")
        ax.axhline(0, color="#bbb", lw=0.8)
        ax.set_xlabel("Sim(GT) ↑")
        ax.set_ylabel("copy-paste CP ↓")
        ax.set_title(f"{sub} · {face_model}")
        ax.set_ylim(-1.15, 1.15)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _thumb(path: str | Path | None, boxes: list | None = None, height: int = 120) -> str | None:
    """A base64 JPEG data URI of the image, faces boxed, scaled to ``height`` px; None if unreadable."""
    if not path:
        return None
    from PIL import Image, ImageDraw

    from ..errors import ImageLoadError
    from ..faces import load_image

    try:
        arr = load_image(path)
    except ImageLoadError:
        return None
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 150))
    for k, b in enumerate(boxes or []):
        draw.rectangle([float(v) for v in b], outline=[(46, 204, 113), (52, 152, 219), (231, 76, 60),
                                                       (241, 196, 15)][k % 4], width=lw)
    scale = height / im.height
    im = im.resize((max(1, round(im.width * scale)), height))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- markdown


def render_markdown(summary: dict[str, Any], plot_files: dict[str, str],
                    failure_files: dict[str, str] | None = None) -> str:
    """The report as Markdown (tables ready to paste)."""
    lines = [f"# MultiID-Bench report — {summary.get('benchmark') or ''}", ""]
    lines += _notes(summary)
    lines += _stale_md(summary)
    for sub in summary["subsets"]:
        for fm, board in summary["leaderboard"][sub].items():
            lines += [f"## {sub} · face model {fm}", "",
                      "| method | n | failed | " + " | ".join(METRICS.values()) + " |",
                      "|---|---|---|" + "---|" * len(METRICS)]
            for meth, e in board.items():
                cells = [_cell(e.get(m)) for m in METRICS]
                lines.append(f"| {meth} | {e['samples']} | {e['failed']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["Cells: mean / robust mean [95 % bootstrap CI] (n).", ""]
    if summary.get("fid"):
        lines += [f"## Fréchet distance, GT vs outputs ({summary['fid']['features']})", "",
                  "| subset | method | FD |", "|---|---|---|"]
        for sub, per in summary["fid"]["fd"].items():
            lines += [f"| {sub} | {m} | {v:.4f} |" for m, v in per.items()]
        lines.append("")
    for fm, f in plot_files.items():
        lines += [f"![Sim(GT) vs CP, {fm}]({f})", ""]
    from .multihuman import markdown as multihuman_markdown

    lines += multihuman_markdown(summary.get("multihuman"))
    from .taxonomy import taxonomy_md

    lines += taxonomy_md(summary, failure_files)
    lines += _problems_md(summary)
    return "\n".join(lines) + "\n"


def _cell(v: dict | None) -> str:
    if not v:
        return "–"
    return f"{_fmt(v)} / {_fmt(v, 'robust_mean')} [{_fmt(v, 'ci_low')}, {_fmt(v, 'ci_high')}] ({v['n']})"


def _notes(summary: dict[str, Any]) -> list[str]:
    out = []
    for fm, gate in summary.get("gates", {}).items():
        out.append(f"- CP gate for **{fm}**: Sim(GT) > {gate[0]:.3f} (one person), > {gate[1]:.3f} (several). "
                   "The paper's 0.40 / 0.35 are tuned for ArcFace (buffalo_l) cosines; each face model has its "
                   "own gate. *CP (gated)* counts only samples passing it, *CP (all)* every sample with a CP.")
    for k, v in summary.get("not_computed", {}).items():
        out.append(f"- {METRICS.get(k, NOTE_LABELS.get(k, k))}: {v}")
    out.append("- References are padded to a black square 1.5× their longer side before detection.")
    if summary.get("cp_normalisation") == "release":
        out.append("- CP as the release's evaluator computes it: each embedding divided by ‖x‖ + 1e-6 before the "
                   "angles (`--cp-normalisation release`, the default, so numbers compare with the paper's).")
    else:
        out.append("- CP with exact unit vectors (`--cp-normalisation exact`); the release's evaluator divides by "
                   "‖x‖ + 1e-6, which moves CP by up to ~1.5e-3.")
    return out + [""]


def stale_sentence(summary: dict[str, Any]) -> str | None:
    """One sentence on the rows left out as stale (per method, with reasons), or None when there are none."""
    per = summary.get("stale_methods") or {}
    if not per:
        return None
    parts = [f"{m} ({sum(1 for r in summary['stale'] if r['method'] == m)} rows: "
             + ", ".join(f"{k} {v}" for k, v in why.items()) + ")" for m, why in per.items()]
    return (f"STALE: {len(summary['stale'])} scored rows no longer match the files on disk or this run's "
            f"settings and are left out of every table: {'; '.join(parts)}. Score them again with "
            "`withanyone bench run BENCH -m NAME=FOLDER` for each of these methods.")


def _stale_md(summary: dict[str, Any]) -> list[str]:
    text = stale_sentence(summary)
    if text is None:
        return []
    lines = ["## Stale rows (not in the tables)", "", f"**{text}**", ""]
    lines += [f"- stale {r['sample']} · {r['method']} · {r['face_model']}: {', '.join(r['why'])}"
              for r in summary["stale"][:200]]
    if len(summary["stale"]) > 200:
        lines.append(f"- … and {len(summary['stale']) - 200} more (summary.json lists all)")
    return lines + [""]


def _problems_md(summary: dict[str, Any]) -> list[str]:
    lines = ["## Problems", ""]
    if summary["problem_counts"]:
        lines += [f"- {k}: {v}" for k, v in summary["problem_counts"].items()]
    else:
        lines.append("- none")
    lines.append("")
    for f in summary["failures"]:
        lines.append(f"- FAILED {f['sample']} · {f['method']} · {f['face_model']}: {f['reason']}")
    for i in summary["issues"]:
        lines.append(f"- issue {i['sample']} · {i['method']} · {i['face_model']}: {i['issue']}")
    return lines + [""]


# -------------------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px;vertical-align:top}th{background:#f4f4f4}
th.sort{cursor:pointer;text-decoration:underline dotted}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#777;font-size:11px}.fail{color:#b00}.note{color:#555;font-size:13px}img.t{display:block;margin:2px 0}
.plot{max-width:100%}
.stale{border:2px solid #b00;background:#fff3f3;padding:4px 12px;margin:12px 0}.stale h2{color:#b00;margin-top:8px}
"""

_JS = """
function sortGallery(col){
  const t=document.getElementById('gallery');const b=t.tBodies[0];
  const rows=Array.from(b.rows);const asc=t.dataset.col===String(col)&&t.dataset.dir!=='asc';
  rows.sort(function(x,y){
    const a=parseFloat(x.cells[col].dataset.v),c=parseFloat(y.cells[col].dataset.v);
    const av=isNaN(a)?Infinity:a,cv=isNaN(c)?Infinity:c;return asc?av-cv:cv-av;});
  rows.forEach(function(r){b.appendChild(r);});t.dataset.col=String(col);t.dataset.dir=asc?'asc':'desc';
}
"""


def render_html(summary: dict[str, Any], plots: dict[str, bytes], gallery: list[dict[str, Any]] | None,
                extra_html: str = "", failure_plots: dict[str, bytes] | None = None) -> str:
    """The self-contained HTML report (inline CSS, JS and base64 images; all text escaped)."""
    e = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>MultiID-Bench report — {e(str(summary.get('benchmark') or ''))}</title>",
             "<link rel='icon' href='data:,'>", f"<style>{_CSS}</style></head><body>",
             f"<h1>MultiID-Bench report — {e(str(summary.get('benchmark') or ''))}</h1>", "<ul class='note'>"]
    parts += [f"<li>{e(n[2:]).replace('**', '')}</li>" for n in _notes(summary) if n]
    parts.append("</ul>")
    stale = stale_sentence(summary)
    if stale is not None:
        parts.append(f"<div class='stale' id='stale'><h2>Stale rows (not in the tables)</h2><p>{e(stale)}</p><ul>")
        parts += [f"<li>{e(r['sample'])} · {e(r['method'])} · {e(r['face_model'])}: {e(', '.join(r['why']))}</li>"
                  for r in summary["stale"][:200]]
        parts.append("</ul></div>")
    for sub in summary["subsets"]:
        for fm, board in summary["leaderboard"][sub].items():
            parts.append(f"<h2>Leaderboard {e(sub)} · face model {e(fm)}</h2>")
            parts.append("<table class='leaderboard'><thead><tr><th>method</th><th>n</th><th>failed</th>"
                         + "".join(f"<th>{e(label)}</th>" for label in METRICS.values()) + "</tr></thead><tbody>")
            for meth, ent in board.items():
                cells = []
                for m in METRICS:
                    v = ent.get(m)
                    if not v:
                        cells.append("<td class='num'>–</td>")
                    else:
                        cells.append(f"<td class='num'>{_fmt(v)}<br><span class='ci'>robust {_fmt(v, 'robust_mean')}"
                                     f" [{_fmt(v, 'ci_low')}, {_fmt(v, 'ci_high')}] n={v['n']}</span></td>")
                parts.append(f"<tr><td>{e(meth)}</td><td class='num'>{ent['samples']}</td>"
                             f"<td class='num'>{ent['failed']}</td>{''.join(cells)}</tr>")
            parts.append("</tbody></table>")
    if summary.get("fid"):
        parts.append(f"<h2>Fréchet distance, GT vs outputs ({e(summary['fid']['features'])})</h2><table>"
                     "<tr><th>subset</th><th>method</th><th>FD</th></tr>")
        for sub, per in summary["fid"]["fd"].items():
            parts += [f"<tr><td>{e(sub)}</td><td>{e(m)}</td><td class='num'>{v:.4f}</td></tr>"
                      for m, v in per.items()]
        parts.append("</table>")
    from .multihuman import html_section as multihuman_html

    parts.append(multihuman_html(summary.get("multihuman")))
    parts.append("<h2>Identity fidelity vs copy-paste</h2>")
    for fm, png in plots.items():
        parts.append(f"<img class='plot' alt='Sim(GT) vs CP, {e(fm)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>")
    from .taxonomy import taxonomy_html

    parts.append(taxonomy_html(summary, failure_plots))
    parts.append("<h2>Problems</h2><ul>")
    if not summary["problem_counts"]:
        parts.append("<li>none</li>")
    parts += [f"<li>{e(k)}: {v}</li>" for k, v in summary["problem_counts"].items()]
    parts.append("</ul><ul class='note'>")
    parts += [f"<li class='fail'>FAILED {e(f['sample'])} · {e(f['method'])} · {e(f['face_model'])}: "
              f"{e(str(f['reason']))}</li>" for f in summary["failures"]]
    parts += [f"<li>{e(i['sample'])} · {e(i['method'])} · {e(i['face_model'])}: {e(i['issue'])}</li>"
              for i in summary["issues"]]
    parts.append("</ul>")
    if gallery:
        total = len({f["sample"] for f in summary["failures"]} | {g["sample"] for g in gallery}
                    | set(summary.get("sample_ids", [])))
        parts.append(_gallery_html(gallery, summary["methods"], total))
    parts.append(extra_html)
    if extra_html:
        from .explorer import EXPLORER_JS

        parts.append(f"<script>{_JS}{EXPLORER_JS}</script></body></html>")
    else:
        parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def _gallery_html(gallery: list[dict[str, Any]], methods: list[str], total: int | None = None) -> str:
    e = html.escape
    shown = (f" Showing {len(gallery)} of {total} samples (write_reports(max_gallery=…) for more)."
             if total and total > len(gallery) else "")
    head = [f"<h2>Gallery</h2><p class='note'>Click a method's CP header to sort by it. Boxes: detected faces."
            f"{shown}</p>",
            "<table id='gallery'><thead><tr><th>sample</th><th>prompt</th><th>GT</th><th>references</th>"]
    base = 4
    for k, m in enumerate(methods):
        head.append(f"<th class='sort' onclick='sortGallery({base + k})'>{e(m)} (CP)</th>")
    head.append("</tr></thead><tbody>")
    body = []
    for g in gallery:
        cells = [f"<td>{e(g['sample'])}<br><span class='ci'>{e(g['subset'])}</span></td>",
                 f"<td>{e(g['prompt'])}</td>",
                 f"<td>{_img(g['gt'], 'GT ' + g['sample'])}</td>",
                 "<td>" + "".join(_img(r, 'reference') for r in g["refs"]) + "</td>"]
        for m in methods:
            o = g["outputs"].get(m)
            if o is None:
                cells.append("<td data-v='NaN'>–</td>")
                continue
            cp = o.get("cp")
            nums = (f"Sim(GT) {_num(o.get('sim_gt'))}<br>Sim(Ref) {_num(o.get('sim_ref'))}<br>CP {_num(cp)}"
                    if o["status"] == "ok" else f"<span class='fail'>{e(str(o['reason']))}</span>")
            issues = "".join(f"<br><span class='ci'>{e(i)}</span>" for i in o.get("issues", []))
            cells.append(f"<td data-v='{'NaN' if cp is None else f'{cp:.6f}'}'>{_img(o['thumb'], m)}"
                         f"<span class='ci'>{e(Path(o['path']).name) if o.get('path') else ''}</span><br>{nums}"
                         f"{issues}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(head) + "".join(body) + "</tbody></table>"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _img(uri: str | None, alt: str) -> str:
    if not uri:
        return "<span class='fail'>(no image)</span>"
    return f"<img class='t' alt='{html.escape(alt)}' src='{uri}'>"


def build_gallery(out_dir: Path, face_model: str, max_samples: int | None = 200) -> list[dict[str, Any]]:
    """Thumbnails and numbers per sample (GT, references, each method's output with its face boxes)."""
    rows = [r for r in current_results(out_dir)[0] if r["face_model"] == face_model]
    samples_path = out_dir / "samples.json"
    info = json.loads(samples_path.read_text()) if samples_path.is_file() else {}
    by_sample: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = by_sample.get(r["sample"])
        if s is None:
            if max_samples is not None and len(by_sample) >= max_samples:
                continue
            meta = info.get(r["sample"], {})
            s = by_sample[r["sample"]] = {
                "sample": r["sample"], "subset": r["subset"], "prompt": meta.get("prompt", ""),
                "gt": _thumb(meta.get("gt"), r.get("gt_boxes")),
                "refs": [_thumb(p, b) for p, b in zip(meta.get("references", []), r.get("ref_boxes", []), strict=False)],
                "outputs": {}}
        s["outputs"][r["method"]] = {**{k: r.get(k) for k in ("sim_gt", "sim_ref", "cp", "status", "reason",
                                                                "issues")},
                                     "path": r.get("output"), "thumb": _thumb(r.get("output"), r.get("out_boxes"))}
    return list(by_sample.values())


def paper_point_models(summary: dict[str, Any]) -> list[str]:
    """Face models whose cosines share the paper's ArcFace scale (so its published points may be drawn on
    their plots); dlib's 128-d cosines are compressed near 1 and are another scale."""
    return [f["name"] for f in summary.get("face_models", []) if f.get("backend") != "dlib"]


def write_reports(out_dir: str | Path, paper_points: bool = False, gallery: bool = True,
                  max_gallery: int | None = 200) -> dict[str, Any]:
    """Write ``summary.json``, ``report.md``, ``report.html`` and ``tradeoff_<model>.png`` into ``out_dir``.

    ``paper_points`` draws the paper's published points only on plots of ArcFace-scale face models."""
    out_dir = Path(out_dir)
    summary = summarize(out_dir)
    models = list(next(iter(summary["leaderboard"].values()), {}).keys())
    arc = set(paper_point_models(summary))
    plots = {fm: tradeoff_plot(summary, fm, paper_points and fm in arc) for fm in models}
    plot_files = {}
    for fm, png in plots.items():
        name = f"tradeoff_{fm}.png"
        atomic_write_bytes(out_dir / name, png)
        plot_files[fm] = name
    from .taxonomy import failure_plots

    fplots = failure_plots(summary)
    failure_files = {}
    for fm, png in fplots.items():
        atomic_write_bytes(out_dir / f"failures_{fm}.png", png)
        failure_files[fm] = f"failures_{fm}.png"
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "report.md", render_markdown(summary, plot_files, failure_files))
    gal = build_gallery(out_dir, models[0], max_gallery) if gallery and models else None
    from .explorer import explorer_html

    extra = explorer_html(out_dir, models[0], max_gallery) if gallery and models else ""
    atomic_write_text(out_dir / "report.html", render_html(summary, plots, gal, extra, fplots))
    return summary
