"""Screenshot of an example workflow in ComfyUI's frontend (for docs/comfyui-graph.png); not a test.

    COMFYUI_DIR=... COMFYUI_PYTHON=... python tests/comfyui_real/screenshot_graph.py [workflow.json] [out.png]

Runs under any python with playwright (the repo's dev extra) and drives the system's Chromium. It starts a
headless ComfyUI (harness.ComfyServer) with the pack in custom_nodes, with placeholder files under the
workflow's model names (nothing is executed) and sample photos as the people, loads the UI-format workflow
through the frontend's ``app.loadGraphData`` and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PLACEHOLDERS = {
    "diffusion_models": ["flux1-dev.safetensors"], "text_encoders": ["clip_l.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors"], "vae": ["ae.safetensors"], "loras": ["style_lora.safetensors"],
    "withanyone": ["withanyone.safetensors"],
}
ARRANGE_JS = """() => {
  const g = window.app.graph, nodes = g._nodes, depth = new Map();
  for (const n of nodes) { const s = n.computeSize(); n.setSize([Math.max(s[0], n.size[0], 260), Math.max(s[1], n.size[1])]); }
  const level = (n, seen = new Set()) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (seen.has(n.id)) return 0; seen.add(n.id);
    let d = 0;
    for (const inp of n.inputs || []) { if (inp.link == null) continue; const l = g.links[inp.link] || g.links.get?.(inp.link);
      if (l) d = Math.max(d, level(g.getNodeById(l.origin_id), seen) + 1); }
    depth.set(n.id, d); return d; };
  for (const n of nodes) level(n);
  const cols = []; for (const n of nodes) { const d = depth.get(n.id); (cols[d] = cols[d] || []).push(n); }
  let x = 0; const maxH = 1000, gap = 40;
  for (const col of cols) { if (!col) continue; col.sort((a, b) => a.pos[1] - b.pos[1]);
    let y = 0, w = 0;
    for (const n of col) { if (y > 0 && y + n.size[1] > maxH) { x += w + gap; y = 0; w = 0; }
      n.pos = [x, y]; y += n.size[1] + gap + 30; w = Math.max(w, n.size[0]); }
    x += w + gap; }
  window.app.canvas.setDirty(true, true); }"""
PHOTOS = ["obama/1.jpg", "scarlett/1.jpg", "newton/1.jpg", "biden/1.jpg"]


def main(workflow: Path, out: Path, width: int = 2400, height: int = 1200, arrange: bool = True) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    comfy_dir = harness.comfyui_dir()
    if comfy_dir is None:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    base = Path(tempfile.mkdtemp(prefix="comfy_shot_"))
    for folder, names in PLACEHOLDERS.items():
        for name in names:
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            (base / "models" / folder / name).write_bytes(b"")
    (base / "models" / "insightface" / "antelopev2").mkdir(parents=True)
    (base / "models" / "insightface" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    (base / "models" / "clip_vision" / "siglip-base-patch16-256-i18n").mkdir(parents=True)
    (base / "models" / "clip_vision" / "siglip-base-patch16-256-i18n" / "config.json").write_text("{}")
    (base / "input").mkdir(parents=True, exist_ok=True)
    (base / "user" / "default").mkdir(parents=True, exist_ok=True)  # no first-run template dialog
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
         "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}))
    for i, rel in enumerate(PHOTOS, start=1):
        Image.open(harness.REPO / "samples" / "faces" / rel).convert("RGB").save(base / "input" / f"person_{i}.png")
    server = harness.ComfyServer(comfy_dir, base, python=os.environ.get("COMFYUI_PYTHON"),
                                 custom_nodes={"withanyone": harness.NODE_PACK})
    try:
        graph = json.loads(workflow.read_text())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(server.url, wait_until="networkidle", timeout=120_000)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
            time.sleep(3)
            page.keyboard.press("Escape")  # any dialog or toast left open
            if arrange:  # each node at its computed size, in columns by graph depth, tall columns wrapped
                page.evaluate(ARRANGE_JS)
                time.sleep(1)
            bottom = page.evaluate("() => { const c = window.app.canvas; const ds = c.ds; "
                          "const b = window.app.graph._nodes.reduce((a, n) => [Math.min(a[0], n.pos[0]), "
                          "Math.min(a[1], n.pos[1]), Math.max(a[2], n.pos[0] + n.size[0]), "
                          "Math.max(a[3], n.pos[1] + n.size[1])], [1e9, 1e9, -1e9, -1e9]); "
                          "const W = c.canvas.width / devicePixelRatio, H = c.canvas.height / devicePixelRatio; "
                          "const s = Math.min((W - 120) / (b[2] - b[0]), (H - 140) / (b[3] - b[1])); "
                          "ds.scale = s; ds.offset[0] = -b[0] + 90 / s; ds.offset[1] = -b[1] + 100 / s; "
                          "c.setDirty(true, true); return (b[3] - b[1]) * s + 140; }")
            time.sleep(2)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": width,
                                                 "height": min(height, int(bottom) + 70)})
            browser.close()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(out)


if __name__ == "__main__":
    wf = Path(sys.argv[1]) if len(sys.argv) > 1 else harness.NODE_PACK / "example_workflows" / "withanyone_2_persons.json"
    main(wf, Path(sys.argv[2]) if len(sys.argv) > 2 else harness.REPO / "docs" / "comfyui-graph.png")
