"""Drive the real ComfyUI web frontend in headless Chromium, the way an artist does.

Used by ``tests/test_browser.py`` (the ``browser`` tier).  The browser is Debian's
``chromium`` (``/usr/bin/chromium``, override with ``LOWBIT_CHROMIUM``) driven by the
Python ``playwright`` package; both are installed by ``scripts/install_browser.sh``.
No browser is ever downloaded (never run ``playwright install``).

Every user action goes through the page: the sidebar's Templates button and the
template browser, the menu's File -> Open with the browser's file chooser, widgets
typed/picked in the node, the Run (queue) button.  The page is *read* from the DOM
the frontend renders: dialogs, node titles, slots, widgets, the frontend's own
invalid-value marking, the error border, progress bars and output images.

The frontend is put in "Nodes 2.0" mode (``Comfy.VueNodes.Enabled``, an ordinary user
setting): nodes are then DOM elements (classic mode draws them on a <canvas>), and it is
the mode in which the frontend marks a combo value that is not one of its options.

    session = BrowserSession.launch()
    page = session.new_page(server)            # fresh browser context (no stored workflows)
    page.load_template("lowbit", "lowbit_rtn_quantize_and_generate")
    problems = check_rendered_workflow(wf, page.rendered_nodes(), page.dialogs(), server.object_info())
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

CHROMIUM_FLAGS = (
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
)
VIEWPORT = {"width": 1920, "height": 1200}

# Ordinary user settings (Settings dialog), stored server-side like the Settings dialog does.
FRONTEND_SETTINGS = {
    "Comfy.VueNodes.Enabled": True,             # "Modern Node Design (Nodes 2.0)": DOM nodes, invalid combos marked
    "Comfy.TutorialCompleted": True,            # no first-run template dialog over the canvas
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,    # keep node text readable when zoomed out to fit
    "Comfy.Minimap.Visible": False,             # cleaner screenshots
    "Comfy.Graph.CanvasInfo": False,
}

MODEL_FILE_RE = re.compile(r"\.(safetensors|sft|ckpt|pt|pth|bin|gguf)$", re.IGNORECASE)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
LOWBIT_CATEGORY = "LowBit"

# --------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------


def chromium_executable() -> str:
    return os.environ.get("LOWBIT_CHROMIUM", "/usr/bin/chromium")


def browser_unavailable_reason() -> Optional[str]:
    """None when the browser tier can run, else why not (shown as the skip reason)."""
    if os.environ.get("LOWBIT_SKIP_BROWSER") == "1":
        return "LOWBIT_SKIP_BROWSER=1"
    exe = chromium_executable()
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return (f"chromium not found at {exe} (run `bash scripts/install_browser.sh` as root, "
                "or set LOWBIT_CHROMIUM)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "python package playwright missing in the venv (run `bash scripts/install_browser.sh`)"
    try:
        out = subprocess.run([exe, "--headless", "--no-sandbox", "--version"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} does not start: {e!r}"
    if out.returncode != 0:
        return f"{exe} --version failed ({out.returncode}): {(out.stderr or out.stdout).strip()[:300]}"
    return None


# --------------------------------------------------------------------------
# server preparation
# --------------------------------------------------------------------------


def apply_frontend_settings(server, settings: Optional[dict] = None) -> None:
    """Store the user settings on the server (POST /settings, what the Settings dialog does)."""
    status, data = server.request("POST", "/settings", dict(settings or FRONTEND_SETTINGS))
    if status != 200:
        raise RuntimeError(f"POST /settings -> {status}: {data}")


def model_file_values(workflow: dict) -> List[str]:
    """Model file names a workflow's widgets refer to (e.g. a checkpoint name)."""
    names = []
    for node in workflow.get("nodes", []):
        vals = node.get("widgets_values")
        for v in (vals.values() if isinstance(vals, dict) else vals or []):
            if (isinstance(v, str) and MODEL_FILE_RE.search(v) and len(v) < 200 and "\n" not in v
                    and v not in names):
                names.append(v)
    return names


def provide_model_files(server, names: Iterable[str], target: os.PathLike,
                        kinds: Sequence[str] = ("checkpoints", "diffusion_models", "loras", "controlnet")) -> List[Path]:
    """Make ``names`` exist in the server's model folders, as symlinks to ``target``.

    Only for rendering checks: the workflow then finds the models it names, as on an
    artist's machine that has them.  Existing files are left alone.  Returns what was created.
    """
    made = []
    for kind in kinds:
        root = server.models_dir(kind).resolve()
        for name in names:
            path = (root / name).resolve()
            if root not in path.parents:  # a name like ../x must not escape the folder
                continue
            if path.exists() or path.is_symlink():
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(Path(target).resolve())
            except OSError:
                continue
            made.append(path)
    return made


def remove_files(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# browser
# --------------------------------------------------------------------------


CORE_TEMPLATE_MEDIA = (".webp", ".png", ".jpg", ".jpeg", ".gif", ".mp4", ".webm", ".mp3", ".wav", ".flac", ".glb")


class BrowserSession:
    """playwright + one headless Chromium; ``new_page`` opens ComfyUI in a fresh context."""

    def __init__(self, playwright_cm, playwright, browser):
        self._cm = playwright_cm
        self.playwright = playwright
        self.browser = browser
        self.pages: List["ComfyPage"] = []

    @classmethod
    def launch(cls) -> "BrowserSession":
        from playwright.sync_api import sync_playwright

        cm = sync_playwright()
        pw = cm.__enter__()
        try:
            # launch() runs Chromium on a fresh temporary --user-data-dir of its own
            browser = pw.chromium.launch(executable_path=chromium_executable(), headless=True,
                                         args=list(CHROMIUM_FLAGS))
        except BaseException:
            cm.__exit__(None, None, None)
            raise
        return cls(cm, pw, browser)

    def new_page(self, server, viewport: Optional[dict] = None, open_app: bool = True) -> "ComfyPage":
        context = self.browser.new_context(viewport=viewport or VIEWPORT, device_scale_factor=1,
                                           accept_downloads=False)
        host = urllib.parse.urlsplit(server.url).netloc

        def only_local(route):  # hermetic: nothing but the ComfyUI server under test
            url = urllib.parse.urlsplit(route.request.url)
            if url.netloc == host and url.path.startswith("/templates/") and url.path.lower().endswith(
                    CORE_TEMPLATE_MEDIA):
                # thumbnails (animated webp, videos) of ComfyUI's own template gallery: no test looks at them,
                # and decoding them in software starves the page on a small CPU machine
                route.abort()
            elif url.netloc == host or route.request.url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                route.abort()

        context.route("**/*", only_local)
        page = ComfyPage(context, context.new_page(), server)
        self.pages.append(page)
        if open_app:
            page.open()
        return page

    def close(self) -> None:
        for p in self.pages:
            p.close()
        try:
            self.browser.close()
        finally:
            self._cm.__exit__(None, None, None)


_INSPECT_JS = r"""
() => {
  const txt = (e) => (e ? (e.innerText || e.textContent || '').trim() : '');
  const out = [];
  for (const node of document.querySelectorAll('[data-node-id]')) {
    const widgets = [...node.querySelectorAll('.lg-node-widget')].map((w) => {
      const label = w.querySelector('p.lod-toggle, label');
      const sel = w.querySelector('.p-select-label');
      const sw = w.querySelector('[role=switch], input[type=checkbox]');
      const field = w.querySelector('input:not([type=hidden]):not([type=checkbox]), textarea');
      let value = null, kind = 'other';
      if (sel) { kind = 'combo'; value = txt(sel); }
      else if (sw) { kind = 'toggle'; value = sw.getAttribute('aria-checked') ?? String(sw.checked); }
      else if (field) {
        kind = field.tagName === 'TEXTAREA' ? 'text' : (field.getAttribute('inputmode') ? 'number' : 'text');
        value = field.value;
      }
      return {label: txt(label), kind, value,
              invalid: !!w.querySelector('.p-invalid, [aria-invalid=true]')};
    });
    const rect = node.getBoundingClientRect();
    const bar = node.querySelector('.bg-primary-500.h-2');
    out.push({
      id: node.dataset.nodeId,
      title: txt(node.querySelector('[data-testid="node-title"]')),
      inputs: [...node.querySelectorAll('.lg-slot--input:not(.lg-slot--dot-only)')].map(txt),
      outputs: [...node.querySelectorAll('.lg-slot--output')].map(txt),
      widgets,
      body: !!node.querySelector('[data-testid^="node-body-"]'),
      error: /(^|\s)border-node-stroke-error(\s|$)/.test(node.className),
      progress: bar ? bar.style.width : null,
      images: [...node.querySelectorAll('img')].map((i) => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight})),
      box: [rect.x, rect.y, rect.width, rect.height],
    });
  }
  return out;
}
"""

# Records, from the DOM, every progress bar width each node shows (MutationObserver: no polling gaps).
_PROGRESS_RECORDER_JS = r"""
() => {
  const seen = (window.__lowbitProgress = window.__lowbitProgress || {});
  const scan = () => {
    for (const bar of document.querySelectorAll('[data-node-id] .bg-primary-500.h-2')) {
      const id = bar.closest('[data-node-id]').dataset.nodeId;
      const w = parseFloat(bar.style.width);
      const list = (seen[id] = seen[id] || []);
      if (!isNaN(w) && list[list.length - 1] !== w) list.push(w);
    }
  };
  if (!window.__lowbitProgressObserver) {
    window.__lowbitProgressObserver = new MutationObserver(scan);
    window.__lowbitProgressObserver.observe(document.body,
      {subtree: true, childList: true, attributes: true, attributeFilter: ['style', 'class']});
  }
  scan();
}
"""


class ComfyPage:
    """One browser tab on the ComfyUI frontend, with the actions an artist takes."""

    def __init__(self, context, page, server):
        self.context = context
        self.page = page
        self.server = server
        self.ws_messages: List[dict] = []     # JSON frames the page's websocket received
        self.console_errors: List[str] = []
        self.page_errors: List[str] = []
        page.on("websocket", self._on_websocket)
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.set_default_timeout(30_000)

    # ---- plumbing ------------------------------------------------------
    def _on_websocket(self, ws):
        def on_frame(payload):
            if isinstance(payload, str):
                try:
                    msg = json.loads(payload)
                except ValueError:
                    return
                if isinstance(msg, dict):
                    msg["_t"] = time.monotonic()
                    self.ws_messages.append(msg)
        ws.on("framereceived", on_frame)

    def close(self) -> None:
        try:
            self.context.close()
        except Exception:
            pass

    def screenshot(self, path: os.PathLike, full_page: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    # ---- app -----------------------------------------------------------
    def open(self, timeout: float = 120.0) -> "ComfyPage":
        self.page.goto(self.server.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """The app is up: Run button shown and the start-up graph rendered as DOM nodes."""
        ms = timeout * 1000
        self.page.locator('[data-testid="queue-button"]').first.wait_for(state="visible", timeout=ms)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && document.querySelector('[data-node-id]')", timeout=ms)

    # ---- dialogs -------------------------------------------------------
    def dialogs(self) -> List[dict]:
        """Open dialogs: key (e.g. global-missing-nodes, global-execution-error), header, text."""
        out = []
        for d in self.page.locator(".p-dialog").all():
            if not d.is_visible():
                continue
            key = d.get_attribute("aria-labelledby") or ""
            header = d.locator(f'[id="{key}"]').all_inner_texts() if key else []
            out.append({"key": key, "header": " ".join(t.strip() for t in header if t.strip()),
                        "text": d.inner_text().strip(), "class": d.get_attribute("class") or ""})
        return out

    def wait_dialog(self, key: str, timeout: float = 60.0):
        loc = self.page.locator(f'.p-dialog[aria-labelledby="{key}"]')
        loc.first.wait_for(state="visible", timeout=timeout * 1000)
        return loc.first

    def close_dialogs(self) -> None:
        """Escape / the close button until no dialog is open."""
        for i in range(6):
            if not self.page.locator(".p-dialog").count():
                return
            close = self.page.locator(".p-dialog .p-dialog-close-button, .p-dialog button:has(> i.pi-times)")
            if i % 2 and close.count():  # the template browser ignores Escape: its x button
                close.first.click()
            else:
                self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(400)
        raise AssertionError(f"dialogs do not close: {self.dialogs()}")

    # ---- loading workflows ---------------------------------------------
    def open_templates(self):
        """Sidebar -> Templates; returns the dialog locator."""
        self.close_dialogs()
        self.page.locator("button.templates-tab-button, button[aria-label='Templates']").first.click()
        content = self.page.locator('[data-testid="template-workflows-content"]')
        content.wait_for(state="visible")
        return self.page.locator(".p-dialog").filter(has=content).first

    def template_names(self, category: str) -> List[str]:
        """Open the template browser, pick ``category`` (a node pack) and list its template cards."""
        dialog = self.open_templates()
        dialog.get_by_text(category, exact=True).first.click()
        cards = dialog.locator('[data-testid^="template-workflow-"]')
        cards.first.wait_for(state="visible")
        names, deadline = None, time.monotonic() + 15
        while time.monotonic() < deadline:  # the grid switches from "All Templates": wait until it is stable
            self.page.wait_for_timeout(400)
            now = [c.get_attribute("data-testid")[len("template-workflow-"):] for c in cards.all()]
            if now and now == names:
                break
            names = now
        return names or []

    def load_template(self, category: str, name: str, expect_nodes: Optional[int] = None) -> None:
        """Sidebar -> Templates -> ``category`` -> click the card ``name``."""
        names = self.template_names(category)
        if name not in names:
            raise AssertionError(f"template {name!r} not listed under {category!r} in the template browser: {names}")
        dialog = self.page.locator(".p-dialog").filter(has=self.page.locator('[data-testid="template-workflows-content"]'))
        dialog.locator(f'[data-testid="template-workflow-{name}"]').click()
        dialog.wait_for(state="detached", timeout=60_000)
        self._wait_loaded(name, expect_nodes)

    def open_workflow_file(self, path: os.PathLike, expect_nodes: Optional[int] = None) -> None:
        """Menu -> File -> Open, then pick ``path`` in the browser's file chooser."""
        self.close_dialogs()
        self.page.locator(".comfy-menu-button-wrapper").first.click()
        menu = self.page.locator(".comfy-command-menu")
        menu.get_by_text("File", exact=True).first.hover()
        with self.page.expect_file_chooser() as fc:
            self.page.get_by_role("menuitem", name="Open", exact=True).first.click()
        fc.value.set_files(str(path))
        self._wait_loaded(Path(path).stem, expect_nodes)

    def _wait_loaded(self, name: str, expect_nodes: Optional[int]) -> None:
        # the workflow's tab becomes the selected one, then its nodes are rendered
        self.page.wait_for_function(
            """name => [...document.querySelectorAll('.workflow-tabs [aria-pressed="true"] .workflow-label')]
                        .some(e => e.textContent.trim() === name)""", arg=name, timeout=60_000)
        if expect_nodes is not None:
            self.page.wait_for_function(
                "n => document.querySelectorAll('[data-node-id]').length === n", arg=expect_nodes,
                timeout=60_000)
        self.page.wait_for_timeout(800)  # widgets/values settle, dialogs appear

    # ---- canvas ----------------------------------------------------------
    def fit_view(self) -> None:
        """Click an empty spot of the canvas and press '.' (Fit view)."""
        spot = self.page.evaluate("""() => {
            const c = document.querySelector('#graph-canvas');
            const r = c.getBoundingClientRect();
            for (const fy of [0.5, 0.3, 0.7, 0.15, 0.85, 0.05, 0.95])
              for (const fx of [0.5, 0.3, 0.7, 0.15, 0.85, 0.05, 0.95]) {
                const x = r.x + r.width * fx, y = r.y + r.height * fy;
                if (document.elementFromPoint(x, y) === c) return [x, y];
              }
            return null;
        }""")
        if spot is None:
            raise AssertionError("no empty spot on the canvas to click")
        self.page.mouse.click(*spot)
        self.page.keyboard.press(".")
        self.page.wait_for_timeout(600)

    # ---- reading the rendered graph ------------------------------------
    def rendered_nodes(self) -> List[dict]:
        return self.page.evaluate(_INSPECT_JS)

    def node(self, node_id) -> "object":
        return self.page.locator(f'[data-node-id="{node_id}"]')

    def widget(self, node_id, label: str):
        return self.node(node_id).locator(".lg-node-widget").filter(
            has=self.page.locator("p.lod-toggle", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))

    # ---- editing like a user -------------------------------------------
    def set_number(self, node_id, label: str, value) -> None:
        """Click into the number field, type the value, press Enter."""
        field = self.widget(node_id, label).locator("input").first
        field.click()
        field.press("Control+a")
        field.type(str(value))
        field.press("Enter")
        field.blur()
        self.page.wait_for_timeout(200)

    def select_option(self, node_id, label: str, option: str) -> None:
        """Open the combo's dropdown and click ``option``."""
        self.widget(node_id, label).locator(".p-select").first.click()
        overlay = self.page.locator(".p-select-overlay, .p-select-list-container").last
        overlay.wait_for(state="visible")
        overlay.get_by_role("option", name=option, exact=True).first.click()
        self.page.wait_for_timeout(200)

    def set_text(self, node_id, label: str, value: str) -> None:
        field = self.widget(node_id, label).locator("input, textarea").first
        field.fill(value)
        field.press("Tab")

    # ---- running -------------------------------------------------------
    def queue(self) -> None:
        """Click Run."""
        self.page.locator('[data-testid="queue-button"]').first.click()

    def start_progress_recorder(self) -> None:
        self.page.evaluate(_PROGRESS_RECORDER_JS)

    def progress_seen(self) -> Dict[str, List[float]]:
        """node id -> progress bar widths (%) the page rendered since start_progress_recorder()."""
        return self.page.evaluate("() => window.__lowbitProgress || {}")

    def ws(self, type_: str, prompt_id: Optional[str] = None) -> List[dict]:
        return [m for m in self.ws_messages if m.get("type") == type_
                and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]


# --------------------------------------------------------------------------
# checks (pure functions on what was read from the page)
# --------------------------------------------------------------------------


def is_lowbit_type(node_type: str, object_info: dict) -> bool:
    info = object_info.get(node_type)
    if info is not None:
        return str(info.get("category", "")).startswith(LOWBIT_CATEGORY)
    return node_type.startswith("LowBit")


def _inputs(info: dict) -> List[tuple]:
    """(name, type, options) in the node's input order, required then optional."""
    out = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section) or {}
        for name in order.get(section) or list(spec):
            if name not in spec:
                continue
            t = spec[name][0]
            opts = spec[name][1] if len(spec[name]) > 1 and isinstance(spec[name][1], dict) else {}
            out.append((name, t, opts))
    return out


def _is_widget(t) -> bool:
    return isinstance(t, list) or t in WIDGET_TYPES


def _combo_options(t, opts) -> Optional[list]:
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return opts.get("options") or opts.get("values")
    return None


def _num(s):
    try:
        return float(str(s).replace(",", "").strip())
    except ValueError:
        return None


def _same(shown, expected) -> bool:
    if isinstance(expected, bool):
        return str(shown).lower() == str(expected).lower()
    if isinstance(expected, (int, float)):
        v = _num(shown)
        return v is not None and math.isclose(v, float(expected), rel_tol=1e-6, abs_tol=1e-6)
    return str(shown) == str(expected)


def widget_slots(node: dict, info: dict) -> Dict[str, int]:
    """Widget name -> its index in the workflow node's ``widgets_values`` list (input order;
    a ``control_after_generate`` value follows its widget)."""
    out, i = {}, 0
    for name, t, opts in _inputs(info):
        if not _is_widget(t):
            continue
        out[name] = i
        i += 2 if opts.get("control_after_generate") else 1
    return out


def expected_widget_values(node: dict, info: dict) -> Dict[str, object]:
    """Widget name -> value the workflow file stores for it."""
    vals = node.get("widgets_values")
    if isinstance(vals, dict):
        return dict(vals)
    vals = list(vals or [])
    linked = {i.get("name") for i in node.get("inputs") or [] if i.get("widget") and i.get("link") is not None}
    return {name: vals[i] for name, i in widget_slots(node, info).items() if i < len(vals) and name not in linked}


def check_rendered_workflow(workflow: dict, rendered: List[dict], dialogs: List[dict], object_info: dict) -> List[str]:
    """Problems an artist would see after loading ``workflow``; [] when it is fine.

    * no dialog opened by the load (missing nodes, missing models, errors)
    * every workflow node is rendered, none marked broken (the frontend's red error border)
    * every LowBit node shows its title, its input and output slots and its widgets (names from
      the server's node definitions) holding the values stored in the file
    * no widget anywhere shows an invalid value: marked invalid by the frontend (combo value
      not among the options), or outside the node definition's min/max
    """
    problems = []
    for d in dialogs:
        what = {"global-missing-nodes": "missing nodes dialog",
                "global-missing-models-warning": "missing models dialog",
                "global-execution-error": "error dialog"}.get(d["key"], f"dialog {d['key'] or d['header']!r}")
        problems.append(f"{what} shown: {d['text'][:400]!r}")

    by_id = {str(n["id"]): n for n in rendered}
    for node in workflow.get("nodes", []):
        nid, ntype = str(node["id"]), node.get("type", "")
        label = f"node {nid} ({ntype})"
        r = by_id.get(nid)
        if r is None:
            problems.append(f"{label} is not rendered")
            continue
        if r["error"]:
            problems.append(f"{label} is marked broken (red error border)")
        info = object_info.get(ntype)
        lowbit = is_lowbit_type(ntype, object_info)
        if info is None:
            if lowbit:
                problems.append(f"{label}: node type unknown to the server (not installed / renamed)")
            continue
        title = node.get("title") or info.get("display_name") or ntype
        if lowbit and r["title"] != title:
            problems.append(f"{label}: title shows {r['title']!r}, expected {title!r}")
        shown = {}
        for w in r["widgets"]:
            shown.setdefault(w["label"], w)
        if lowbit:
            if not r["body"]:
                problems.append(f"{label}: node body not rendered")
            linked = {i.get("name") for i in node.get("inputs") or [] if i.get("widget")}
            for name, t, opts in _inputs(info):
                if _is_widget(t):
                    if name in linked:
                        continue
                    if opts.get("multiline"):
                        if not any(w["kind"] == "text" for w in r["widgets"]):
                            problems.append(f"{label}: text widget {name!r} not rendered")
                    elif name not in shown and opts.get("display_name", name) not in shown:
                        problems.append(f"{label}: widget {name!r} not rendered (shown: {sorted(shown)})")
                elif name not in r["inputs"] and opts.get("display_name", name) not in r["inputs"]:
                    problems.append(f"{label}: input slot {name!r} not rendered (shown: {r['inputs']})")
            for out_name in info.get("output_name") or info.get("output") or []:
                if out_name not in r["outputs"]:
                    problems.append(f"{label}: output slot {out_name!r} not rendered (shown: {r['outputs']})")
            for name, value in expected_widget_values(node, info).items():
                w = shown.get(name)
                if w is not None and w["kind"] in ("combo", "number", "toggle") and not _same(w["value"], value):
                    problems.append(f"{label}: widget {name!r} shows {w['value']!r}, the file stores {value!r}")
        # invalid values, any node
        specs = {name: (t, opts) for name, t, opts in _inputs(info)}
        for w in r["widgets"]:
            wname = w["label"]
            if w["invalid"]:
                hint = ""
                if MODEL_FILE_RE.search(str(w["value"])):
                    hint = (" -- a model file the test server lacks: tests/helpers/browser.py provide_model_files "
                            "covers checkpoints/diffusion_models/loras/controlnet only")
                problems.append(f"{label}: widget {wname!r} shows invalid value {w['value']!r} (marked by the frontend)"
                                + hint)
                continue
            if wname not in specs:
                continue
            t, opts = specs[wname]
            options = _combo_options(t, opts)
            if w["kind"] == "combo" and options is not None and w["value"] not in [str(o) for o in options]:
                problems.append(f"{label}: widget {wname!r} shows {w['value']!r}, not one of its options")
            if w["kind"] == "number" and t in ("INT", "FLOAT"):
                v = _num(w["value"])
                lo, hi = opts.get("min"), opts.get("max")
                if v is None:
                    problems.append(f"{label}: widget {wname!r} shows non-number {w['value']!r}")
                elif (lo is not None and v < lo) or (hi is not None and v > hi):
                    problems.append(f"{label}: widget {wname!r} shows {w['value']}, outside [{lo}, {hi}]")
    extra = set(by_id) - {str(n["id"]) for n in workflow.get("nodes", [])}
    if extra:
        problems.append(f"nodes rendered that the workflow does not have: {sorted(extra)}")
    return problems


# --------------------------------------------------------------------------
# deliberately broken copies (proof that the checks can fail)
# --------------------------------------------------------------------------


def broken_copies(workflow: dict, object_info: dict) -> Dict[str, tuple]:
    """name -> (broken workflow, substrings check_rendered_workflow must report)."""
    nodes = workflow.get("nodes", [])
    lowbit = [n for n in nodes if is_lowbit_type(n.get("type", ""), object_info) and n.get("type") in object_info]
    if not lowbit:
        return {}
    out = {}
    wf = json.loads(json.dumps(workflow))
    victim = next(n for n in wf["nodes"] if n["id"] == lowbit[0]["id"])
    victim["type"] = "LowBitNoSuchNode"
    out["unknown_node_type"] = (wf, ["missing nodes dialog", f"node {victim['id']} (LowBitNoSuchNode)"])

    for n in lowbit:
        info = object_info[n["type"]]
        stored = expected_widget_values(n, info)
        for name, t, opts in _inputs(info):
            if _combo_options(t, opts) is not None and name in stored:
                wf = json.loads(json.dumps(workflow))
                node = next(x for x in wf["nodes"] if x["id"] == n["id"])
                vals = node["widgets_values"]
                bad = "no_such_option_for_lowbit"
                vals[name if isinstance(vals, dict) else widget_slots(node, info)[name]] = bad
                out["bad_combo_value"] = (wf, [f"widget {name!r} shows invalid value {bad!r}"])
                break
        if "bad_combo_value" in out:
            break
    for n in lowbit:
        info = object_info[n["type"]]
        stored = expected_widget_values(n, info)
        for name, t, opts in _inputs(info):
            if t == "INT" and opts.get("max") is not None and name in stored and isinstance(n["widgets_values"], list):
                wf = json.loads(json.dumps(workflow))
                node = next(x for x in wf["nodes"] if x["id"] == n["id"])
                node["widgets_values"][widget_slots(node, info)[name]] = int(opts["max"]) + 91
                out["out_of_range_number"] = (wf, [f"widget {name!r} shows {int(opts['max']) + 91}, outside"])
                break
        if "out_of_range_number" in out:
            break
    return out


def write_json(path: os.PathLike, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def copy_screenshot(src: os.PathLike, dst: os.PathLike) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
