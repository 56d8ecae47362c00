"""Per-sample explorer for ``report.html``: one row per (sample, method), sortable by every number.

Each row shows the GT, the references and the output as thumbnails with their faces boxed, the colours
tying each generated face to the GT face and the reference it was matched to (Hungarian pairings of the
run), and per face: cosine to its GT face and to its reference, CP, the nearest reference and whether the
face is confused (see ``multi_metrics``). Everything is inline (base64 images, inline JS); text escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .runner import current_results

#: Box colours, one per generated face (its matched GT face and reference share it).
COLOURS = [(46, 204, 113), (52, 152, 219), (231, 76, 60), (241, 196, 15), (155, 89, 182), (26, 188, 156)]
GREY = (160, 160, 160)

#: The explorer's sorting script (the report puts it into its one ``<script>``).
EXPLORER_JS = """
function sortExplorer(col){
  const t=document.getElementById('explorer');const b=t.tBodies[0];
  const rows=Array.from(b.rows);const asc=t.dataset.col===String(col)&&t.dataset.dir!=='asc';
  rows.sort(function(x,y){
    const xv=x.cells[col].dataset.v,yv=y.cells[col].dataset.v;
    const a=parseFloat(xv),c=parseFloat(yv);
    if(isNaN(a)&&isNaN(c)){return asc?String(xv).localeCompare(String(yv)):String(yv).localeCompare(String(xv));}
    const av=isNaN(a)?Infinity:a,cv=isNaN(c)?Infinity:c;return asc?av-cv:cv-av;});
  rows.forEach(function(r){b.appendChild(r);});t.dataset.col=String(col);t.dataset.dir=asc?'asc':'desc';
}
function filterExplorer(label){
  const rows=document.getElementById('explorer').tBodies[0].rows;
  for(const r of rows){const l=(r.dataset.labels||'').split(' ');
    r.style.display=(label==='all'||l.indexOf(label)>=0)?'':'none';}
}
"""


def boxed_thumb(path: str | Path | None, boxes: list[list[float]] | None, colours: list[tuple[int, int, int]],
                height: int = 110) -> str | None:
    """Base64 JPEG data URI of the image scaled to ``height`` px, ``boxes[k]`` drawn in ``colours[k]``."""
    if not path:
        return None
    from PIL import Image, ImageDraw

    from ..errors import ImageLoadError
    from ..faces import load_image

    try:
        im = Image.fromarray(load_image(path))
    except ImageLoadError:
        return None
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 120))
    for k, b in enumerate(boxes or []):
        draw.rectangle([float(v) for v in b], outline=colours[k] if k < len(colours) else GREY, width=lw)
    scale = height / im.height
    im = im.resize((max(1, round(im.width * scale)), height))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(i: int) -> tuple[int, int, int]:
    return COLOURS[i % len(COLOURS)]


def explorer_rows(out_dir: str | Path, face_model: str, max_samples: int | None = 200) -> list[dict[str, Any]]:
    """Rows for the explorer: numbers and thumbnails per (sample, method) of ``face_model``."""
    out_dir = Path(out_dir)
    info_path = out_dir / "samples.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    rows = [r for r in current_results(out_dir)[0] if r["face_model"] == face_model]
    from .taxonomy import classify_row, thresholds_by_model

    try:
        run_cfg = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        run_cfg = {}
    th = thresholds_by_model(run_cfg.get("face_models", []) if isinstance(run_cfg, dict) else [],
                             [face_model]).get(face_model)
    keep = list(dict.fromkeys(r["sample"] for r in rows))
    if max_samples is not None:
        keep = keep[:max_samples]
    wanted = set(keep)
    result = []
    for r in rows:
        if r["sample"] not in wanted:
            continue
        meta = info.get(r["sample"], {})
        n_out = len(r.get("out_boxes") or [])
        gt_boxes = r.get("gt_boxes") or []
        gt_col = [GREY] * len(gt_boxes)
        for i, j in r.get("gt_pairs") or []:
            if j < len(gt_col):
                gt_col[j] = _colour(i)
        refs = meta.get("references", [])
        ref_boxes = r.get("ref_boxes") or []
        ref_col = [[GREY] for _ in refs]
        for i, k in r.get("ref_pairs") or []:
            if k < len(ref_col):
                ref_col[k] = [_colour(i)]
        faces = []
        sg = dict(zip([i for i, _ in r.get("gt_pairs") or []], r.get("face_sim_gt") or [], strict=False))
        sr = dict(zip([i for i, _ in r.get("ref_pairs") or []], r.get("face_sim_ref") or [], strict=False))
        conf = r.get("confusion_faces") or []
        cps = r.get("cp_faces") or []
        for i in range(n_out):
            c = conf[i] if i < len(conf) else {}
            faces.append({"face": i, "sim_gt": sg.get(i), "sim_ref": sr.get(i), "cp": cps[i] if i < len(cps) else None,
                          "nearest_ref": c.get("nearest"), "person": c.get("person"), "confused": c.get("confused")})
        result.append({
            "sample": r["sample"], "method": r["method"], "subset": r["subset"], "prompt": meta.get("prompt", ""),
            "num_persons": r.get("num_persons"), "out_faces": r.get("out_faces"), "status": r["status"],
            "reason": r.get("reason"), "count_acc": r.get("count_acc"), "sim_gt": r.get("sim_gt"),
            "sim_ref": r.get("sim_ref"), "cp": r.get("cp"), "identity_confusion": r.get("identity_confusion"),
            "faces": faces,
            **_failure(classify_row(r, th) if th is not None else None),
            "gt": boxed_thumb(meta.get("gt"), gt_boxes, gt_col),
            "refs": [boxed_thumb(p, ref_boxes[k] if k < len(ref_boxes) else None, ref_col[k])
                     for k, p in enumerate(refs)],
            "output": boxed_thumb(r.get("output"), r.get("out_boxes"), [_colour(i) for i in range(n_out)]),
        })
    return result


def _failure(t: Any) -> dict[str, Any]:
    """The explorer's taxonomy fields of one row: primary label (None: not classified), all labels, slots."""
    if t is None:
        return {"failure": None, "failure_labels": [], "slots": []}
    return {"failure": t.primary, "failure_labels": list(t.labels), "slots": list(t.slots)}


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _dv(v: Any) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    return f"{v:.6f}" if isinstance(v, float) else html.escape(str(v), quote=True)


def _img(uri: str | None, alt: str) -> str:
    if not uri:
        return "<span class='fail'>(no image)</span>"
    return f"<img class='t' alt='{html.escape(alt, quote=True)}' src='{uri}'>"


def render_explorer(rows: list[dict[str, Any]], face_model: str) -> str:
    """The explorer section (heading, note, sortable table; its script is :data:`EXPLORER_JS`)."""
    e = html.escape
    cols = [("sample", "sample"), ("method", "method"), ("subset", "subset"), ("num_persons", "people"),
            ("out_faces", "faces"), ("count_acc", "count ok"), ("sim_gt", "Sim(GT)"), ("sim_ref", "Sim(Ref)"),
            ("cp", "CP"), ("identity_confusion", "ID confusion"), ("failure", "failure")]
    head = "".join(f"<th class='sort' onclick='sortExplorer({k})'>{e(label)}</th>" for k, (_, label) in enumerate(cols))
    parts = [f"<h2>Per-sample explorer · face model {e(face_model)}</h2>",
             "<p class='note'>Click a header to sort. Box colours tie each generated face to the GT face and the "
             "reference it was matched to (grey: unmatched). Per face: cosine to its GT face / reference, CP, "
             "nearest reference (by cosine) and whether it stands where another person should be.</p>",
             _filter_html(rows),
             f"<table id='explorer'><thead><tr>{head}<th>GT</th><th>references</th><th>output</th>"
             "<th>per face</th></tr></thead><tbody>"]
    for r in rows:
        cells = "".join(f"<td class='num' data-v='{_dv(r[key])}'>{e(_num(r[key]))}</td>" for key, _ in cols)
        face_rows = "".join(
            f"<tr><td style='color:rgb{_colour(f['face'])}'>■ {f['face']}</td><td>{_num(f['sim_gt'])}</td>"
            f"<td>{_num(f['sim_ref'])}</td><td>{_num(f['cp'])}</td>"
            f"<td>{'–' if f['nearest_ref'] is None else 'ref ' + str(f['nearest_ref'] + 1)}</td>"
            f"<td>{'–' if f['person'] is None else 'ref ' + str(f['person'] + 1)}</td>"
            f"<td class='{'fail' if f['confused'] else ''}'>{_num(f['confused'])}</td></tr>" for f in r["faces"])
        per_face = ("<table><tr><th>face</th><th>sim GT</th><th>sim ref</th><th>CP</th><th>nearest</th>"
                    f"<th>placed as</th><th>confused</th></tr>{face_rows}</table>" if r["faces"] else
                    f"<span class='fail'>{e(str(r['reason'] or 'no faces'))}</span>")
        labels = " ".join(r.get("failure_labels") or ([r["failure"]] if r.get("failure") else ["unclassified"]))
        parts.append(f"<tr title='{e(r['prompt'], quote=True)}' data-labels='{e(labels, quote=True)}'>{cells}<td>{_img(r['gt'], 'GT')}</td>"
                     f"<td>{''.join(_img(u, 'reference') for u in r['refs'])}</td>"
                     f"<td>{_img(r['output'], 'output')}</td><td>{per_face}</td></tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _filter_html(rows: list[dict[str, Any]]) -> str:
    """A select that shows only the rows carrying one failure label (the taxonomy's, ``none``, unclassified)."""
    from .taxonomy import LABELS, NONE

    counts = {lab: sum(lab in (r.get("failure_labels") or []) for r in rows) for lab in LABELS}
    counts[NONE] = sum(r.get("failure") == NONE for r in rows)
    counts["unclassified"] = sum(r.get("failure") is None for r in rows)
    opts = "".join(f"<option value='{lab}'>{lab} ({n})</option>" for lab, n in counts.items())
    return ("<p class='note'>Failure label: <select id='explorer_filter' onchange='filterExplorer(this.value)'>"
            f"<option value='all'>all ({len(rows)})</option>{opts}</select> (the failure column shows the primary "
            "label; a row may carry several)</p>")


def explorer_html(out_dir: str | Path, face_model: str, max_samples: int | None = 200) -> str:
    """The explorer section for ``report.html`` from ``<out>/results.jsonl`` (empty when there are no rows)."""
    rows = explorer_rows(out_dir, face_model, max_samples)
    return render_explorer(rows, face_model) if rows else ""
