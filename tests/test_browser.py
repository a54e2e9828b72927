"""Browser tier: what an artist sees and clicks in the real ComfyUI frontend.

Runs the real ComfyUI server (the session ``comfy_server`` fixture: ``--cpu``, frontend from
the pinned ``comfyui-frontend-package``, the pack linked into custom_nodes) and opens it in
headless Chromium through playwright (``tests/helpers/browser.py``).

* every UI workflow in ``workflows/`` is listed in the template browser under the pack and
  loads from there cleanly (no missing-nodes dialog, LowBit nodes fully rendered, no widget
  with an invalid value); a screenshot of each goes to ``tests/artifacts/browser/``
* deliberately broken copies (unknown node type, bad combo value, out-of-range number),
  opened with File -> Open, make those checks fail
* a non-LowBit file picked in "Load LowBit UNet" gives ComfyUI's error dialog with our message
  and highlights the node (tiny graph, no SDXL)
* the testbed compare workflow (trained testbed -> RTN W4 -> fp | quantized | difference), with its
  steps changed in the page, is run with the Run button: the quantize and compare nodes' progress bars
  are shown and the grid appears (seconds; no SDXL is loaded by this tier)

Run alone with ``pytest -m browser``.  Skips when ``LOWBIT_SKIP_BROWSER=1`` or when chromium /
playwright are missing (``bash scripts/install_browser.sh`` installs them); under CI
(``CI=true``) a missing browser is a failure instead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helpers.browser import (BrowserSession, apply_frontend_settings, broken_copies, browser_unavailable_reason,
                             check_rendered_workflow, copy_screenshot, is_lowbit_type, model_file_values,
                             provide_model_files, remove_files, write_json)
from helpers.comfy_env import repo_root

pytestmark = [pytest.mark.browser, pytest.mark.comfy_server]

ROOT = repo_root()
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# the RTN quantize-and-generate workflow: its editor view is the README screenshot (loaded, never run here)
GENERATE_WORKFLOW = "lowbit_rtn_quantize_and_generate"
# the workflow run from the UI: RTN + compare on the trained testbed (seconds on a CPU); its result is the
# README screenshot of the compare node's output
RUN_WORKFLOW = "lowbit_testbed_compare"
RUN_STEPS = 12
VIEWPORT_CORNER = (960, 1150)  # an empty canvas spot below the zoomed nodes: the mouse rests there
PLAIN_FILE = "lowbit_browser_not_lowbit.safetensors"
RUN_TIMEOUT_S = float(os.environ.get("LOWBIT_BROWSER_RUN_TIMEOUT", "300"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _first(workflow: dict, node_type: str) -> dict:
    nodes = [n for n in workflow["nodes"] if n["type"] == node_type]
    assert nodes, f"workflow has no {node_type} node"
    return nodes[0]


def _report(problems) -> str:
    return "\n  - " + "\n  - ".join(problems) if problems else ""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def _browser_available():
    reason = browser_unavailable_reason()
    if reason is None:
        return
    msg = f"browser tier not run: {reason}"
    print(f"\n[browser] {msg}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.environ.get("LOWBIT_SKIP_BROWSER") != "1":
        pytest.fail(f"{msg} (CI must run it: scripts/setup.sh installs the browser; LOWBIT_SKIP_BROWSER=1 to opt out)",
                    pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def env(_browser_available, comfy_server, sdxl_ckpt, timings):
    """The shared server prepared for the frontend, and one Chromium for the module."""
    import torch
    from safetensors.torch import save_file

    apply_frontend_settings(comfy_server)
    # models the workflows name exist (links to the random SDXL file: never loaded by the load checks),
    # as on an artist's machine that has them; created before any page asks for the model lists
    names = sorted({n for p in UI_WORKFLOWS for n in model_file_values(_load(p))})
    made = provide_model_files(comfy_server, names, sdxl_ckpt)
    plain = comfy_server.models_dir("diffusion_models") / PLAIN_FILE  # a plain, non-LowBit safetensors file
    made.append(plain)
    session = None
    try:
        save_file({"weight": torch.zeros(8, 8, dtype=torch.float16)}, str(plain))
        t0 = time.perf_counter()
        session = BrowserSession.launch()
        timings["browser: chromium launch"] = time.perf_counter() - t0
        yield {"server": comfy_server, "session": session, "object_info": comfy_server.object_info()}
    finally:
        if session is not None:
            session.close()
        remove_files(made)


def _save_final(p, request) -> None:
    try:
        p.screenshot(ARTIFACTS / f"{request.node.name}.final.png")
        (ARTIFACTS / f"{request.node.name}.console.txt").write_text(
            "\n".join(["[page errors]", *p.page_errors, "[console errors]", *p.console_errors, ""]))
    except Exception as e:  # never hide the test's own outcome
        print(f"[browser] could not save final screenshot: {e!r}")


@pytest.fixture(scope="module")
def _editor(env, timings):
    t0 = time.perf_counter()
    p = env["session"].new_page(env["server"])
    timings["browser: page open"] = time.perf_counter() - t0
    yield p
    p.close()


@pytest.fixture
def editor(_editor, request):
    """One tab shared by the tests that only load workflows (each load opens its own workflow tab)."""
    _editor.close_dialogs()
    yield _editor
    _save_final(_editor, request)


@pytest.fixture
def page(env, request):
    """A fresh browser context (no stored workflows, no execution state), for tests that run prompts."""
    p = env["session"].new_page(env["server"])
    yield p
    _save_final(p, request)
    p.close()


def _pack_category(server) -> str:
    """The template-browser category of this pack (its folder name under custom_nodes)."""
    listing = server.get_json("/workflow_templates")
    stems = {p.stem for p in UI_WORKFLOWS}
    for module, names in listing.items():
        if stems & set(names):
            return module
    raise AssertionError(f"the server lists no template of this pack (GET /workflow_templates -> {listing})")


# --------------------------------------------------------------------------- template browser


def test_there_are_workflows():
    assert UI_WORKFLOWS, "workflows/*.json: no UI workflow to check"


def test_template_browser_lists_every_pack_workflow(env, editor):
    page = editor
    category = _pack_category(env["server"])
    shown = page.template_names(category)
    page.screenshot(ARTIFACTS / "template_browser.png")
    assert sorted(shown) == sorted(p.stem for p in UI_WORKFLOWS), \
        f"template browser under {category!r} shows {shown}"


@pytest.mark.parametrize("wf_path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_workflow_loads_clean_from_template_browser(env, editor, wf_path):
    page = editor
    workflow = _load(wf_path)
    page.load_template(_pack_category(env["server"]), wf_path.stem, expect_nodes=len(workflow["nodes"]))
    dialogs = page.dialogs()  # before any click: a click outside a dialog may close it
    if not dialogs:
        page.fit_view()
    shot = page.screenshot(ARTIFACTS / f"workflow_{wf_path.stem}.png")
    problems = check_rendered_workflow(workflow, page.rendered_nodes(), dialogs, env["object_info"])
    assert not problems, f"{wf_path.name} loaded from the template browser:{_report(problems)}\nscreenshot: {shot}"
    assert any(is_lowbit_type(n["type"], env["object_info"]) for n in workflow["nodes"]), \
        f"{wf_path.name} has no LowBit node"
    if wf_path.stem == GENERATE_WORKFLOW:
        copy_screenshot(shot, DOCS_SCREENSHOTS / "lowbit_workflow_editor.png")


# --------------------------------------------------------------------------- the checks can fail


def _broken_cases():
    path = ROOT / "workflows" / f"{GENERATE_WORKFLOW}.json"
    if not path.exists() and UI_WORKFLOWS:
        path = UI_WORKFLOWS[0]
    return path


@pytest.mark.parametrize("case", ["pristine", "unknown_node_type", "bad_combo_value", "out_of_range_number"])
def test_checks_fail_on_broken_copies(env, editor, case):
    """File -> Open of a copy: the pristine copy passes, every broken copy is reported."""
    page = editor
    src = _broken_cases()
    workflow = _load(src)
    if case == "pristine":
        broken, expected = workflow, []
    else:
        cases = broken_copies(workflow, env["object_info"])
        assert case in cases, f"cannot build the {case} copy from {src.name} (cases: {sorted(cases)})"
        broken, expected = cases[case]
    path = write_json(ARTIFACTS / "files" / f"{case}_{src.stem}.json", broken)
    page.open_workflow_file(path, expect_nodes=len(broken["nodes"]))
    dialogs = page.dialogs()
    if not dialogs:
        page.fit_view()
    page.screenshot(ARTIFACTS / f"broken_{case}.png")
    problems = check_rendered_workflow(broken, page.rendered_nodes(), dialogs, env["object_info"])
    if not expected:
        assert not problems, f"pristine copy of {src.name} via File -> Open:{_report(problems)}"
    for want in expected:
        assert any(want in p for p in problems), f"{case}: checker did not report {want!r}; it reported:{_report(problems)}"


# --------------------------------------------------------------------------- error path (no SDXL)


def _load_and_info_workflow(unet_name: str) -> dict:
    """LowBitLoadQuantizedUNet -> LowBitModelInfo, UI format."""
    return {
        "last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "links": [[1, 1, 0, 2, 0, "MODEL"]],
        "nodes": [
            {"id": 1, "type": "LowBitLoadQuantizedUNet", "pos": [0, 0], "size": [360, 90], "flags": {}, "order": 0,
             "mode": 0, "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0}],
             "properties": {"Node name for S&R": "LowBitLoadQuantizedUNet"}, "widgets_values": [unet_name]},
            {"id": 2, "type": "LowBitModelInfo", "pos": [460, 0], "size": [360, 160], "flags": {}, "order": 1,
             "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
             "outputs": [{"name": "report", "type": "STRING", "links": None, "slot_index": 0}],
             "properties": {"Node name for S&R": "LowBitModelInfo"}, "widgets_values": []},
        ],
    }


def test_non_lowbit_file_shows_error_dialog_and_highlights_node(env, page):
    workflow = _load_and_info_workflow(PLAIN_FILE)
    path = write_json(ARTIFACTS / "files" / "load_plain_file.json", workflow)
    page.open_workflow_file(path, expect_nodes=2)
    problems = check_rendered_workflow(workflow, page.rendered_nodes(), page.dialogs(), env["object_info"])
    assert not problems, f"the tiny workflow should load clean:{_report(problems)}"

    page.queue()
    dialog = page.wait_dialog("global-execution-error", timeout=120)
    page.page.wait_for_timeout(500)
    page.screenshot(ARTIFACTS / "error_not_lowbit_file.png")
    text = dialog.inner_text()
    assert "not a LowBit file" in text, f"error dialog text: {text!r}"
    assert PLAIN_FILE in text and "LowBitLoadQuantizedUNet" in text, f"error dialog text: {text!r}"
    assert "Traceback" not in text, "the dialog should show our message, not a traceback"

    nodes = {n["id"]: n for n in page.rendered_nodes()}
    assert nodes["1"]["error"], "Load LowBit UNet is not highlighted as the failing node"
    assert not nodes["2"]["error"], "LowBit Model Info should not be highlighted"
    page.close_dialogs()
    page.screenshot(ARTIFACTS / "error_not_lowbit_file_node.png")
    assert page.page.locator('.p-dialog[aria-labelledby="global-execution-error"]').count() == 0


# --------------------------------------------------------------------------- a workflow run from the UI (testbed)


@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_testbed_compare_from_template_shows_progress_and_image(env, page, timings):
    """Template -> edit a widget -> Run: the quantize and compare nodes show progress, the grid appears.

    The trained testbed (LowBitTestbedLoader) makes this a seconds-long run on a CPU; the page's final state
    is the README screenshot of the compare node's output."""
    server = env["server"]
    workflow = _load(ROOT / "workflows" / f"{RUN_WORKFLOW}.json")
    quant = _first(workflow, "LowBitQuantizeUNet")["id"]
    compare = _first(workflow, "LowBitCompare")["id"]
    preview = _first(workflow, "PreviewImage")["id"]
    enlarge = _first(workflow, "ImageScaleBy")["widgets_values"][1]

    # a run of the same graph earlier in this server's life (e.g. test_testbed_workflow) would be served from
    # ComfyUI's execution cache, with no quantize progress to show: start from an empty cache
    server.free()
    page.load_template(_pack_category(server), RUN_WORKFLOW, expect_nodes=len(workflow["nodes"]))
    # what the artist does: change a setting (the compare node's steps), then Run
    page.set_number(compare, "steps", RUN_STEPS)
    shown = {n["id"]: {w["label"]: w["value"] for w in n["widgets"]} for n in page.rendered_nodes()}
    assert shown[str(compare)]["steps"] == str(RUN_STEPS)
    assert not page.dialogs()

    page.fit_view()
    page.start_progress_recorder()
    t0 = time.perf_counter()
    page.queue()
    # the grid appears in the Preview Image node (or an error dialog does)
    page.page.wait_for_function(
        """id => {
             const img = document.querySelector(`[data-node-id="${id}"] img`);
             return (img && img.complete && img.naturalWidth > 0)
                    || document.querySelector('.p-dialog[aria-labelledby="global-execution-error"]');
           }""", arg=str(preview), timeout=RUN_TIMEOUT_S * 1000, polling=100)
    timings["browser: testbed compare run (queue -> image)"] = time.perf_counter() - t0
    page.page.wait_for_timeout(500)
    page.fit_view()
    shot = page.screenshot(ARTIFACTS / "testbed_compare_result.png")
    dialogs = page.dialogs()
    assert not dialogs, f"dialog during the run: {dialogs}"

    nodes = {n["id"]: n for n in page.rendered_nodes()}
    images = [i for i in nodes[str(preview)]["images"] if i["w"] > 0]
    assert images and "/view?" in images[0]["src"], f"no image in Preview Image: {nodes[str(preview)]['images']}"
    assert (images[0]["w"], images[0]["h"]) == (3 * 32 * enlarge, 32 * enlarge), images[0]  # fp | quantized | diff

    started = page.ws("execution_start")
    assert started, "no execution_start message reached the page"
    pid = started[-1]["data"]["prompt_id"]
    cached = [m for m in page.ws("execution_cached", pid) if str(quant) in map(str, m["data"].get("nodes", []))]
    assert not cached, "the quantize node was served from ComfyUI's cache, so no progress could be shown"
    # the progress of both long nodes reached the page (websocket) and was drawn as their progress bars
    for node_id, total in ((quant, None), (compare, 2 * RUN_STEPS)):
        prog = [m["data"] for m in page.ws("progress", pid) if str(m["data"].get("node")) == str(node_id)]
        assert len(prog) >= 3, f"too few progress messages for node {node_id} reached the page: {prog}"
        assert prog[-1]["value"] == prog[-1]["max"] > 1
        assert [p["value"] for p in prog] == sorted(p["value"] for p in prog)
        if total is not None:  # the steps typed into the page are the steps the server ran (fp + quantized)
            assert prog[-1]["max"] == total, prog[-1]
        bars = page.progress_seen().get(str(node_id), [])
        assert bars and max(bars) > 0 and len(set(bars)) >= 2, f"node {node_id}'s progress bar not shown ({bars})"
        print(f"[browser] node {node_id}: {len(prog)} progress messages, {len(bars)} bar widths drawn "
              f"(max {max(bars):.0f}%)")

    t_start = started[-1]["_t"]
    steps = [(m["_t"] - t_start, m["data"].get("node")) for m in page.ws("executing", pid)]
    print("[browser] run timeline (s from execution_start -> node): "
          + ", ".join(f"{t:.1f}:{n}" for t, n in steps))
    out = [m for m in page.ws("executed", pid) if str(m["data"].get("node")) == str(preview)]
    assert out, "no 'executed' message for Preview Image"
    assert out[-1]["data"]["output"]["images"][0]["filename"] in images[0]["src"]
    report = [m for m in page.ws("executed", pid) if str(m["data"].get("node")) == str(compare)]
    assert report, "no 'executed' message (report) for the compare node"
    report = json.loads(report[-1]["data"]["output"]["text"][0])
    assert report["method"] == "rtn" and report["psnr_db"] > 20, report
    # the README picture: the compare node and its grid, the preview widened as an artist would (dragging its
    # corner), filling the view, no tooltip
    _drag_resize(page, preview, 3 * 32 * enlarge / 2, 0)
    page.page.evaluate("() => { window.app.canvas.deselectAll(); window.app.canvas.setDirty(true, true); }")
    _zoom_to_nodes(page, [compare, preview])
    page.page.mouse.move(VIEWPORT_CORNER[0], VIEWPORT_CORNER[1])
    page.page.wait_for_timeout(500)
    shot = page.screenshot(ARTIFACTS / "testbed_compare_result_zoomed.png")
    copy_screenshot(shot, DOCS_SCREENSHOTS / "lowbit_compare_result.png")
    server.free()


def _drag_resize(page, node_id, dx: float, dy: float) -> None:
    """Drag the node's bottom-right resize handle by (dx, dy) screen pixels."""
    handle = page.node(node_id).locator(".cursor-se-resize").first
    box = handle.bounding_box()
    assert box, f"node {node_id} shows no resize handle"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.page.mouse.move(x, y)
    page.page.mouse.down()
    page.page.mouse.move(x + dx, y + dy, steps=10)
    page.page.mouse.up()
    page.page.wait_for_timeout(500)


def _zoom_to_nodes(page, node_ids, margin: float = 40.0) -> None:
    """Animate the canvas so the nodes' rendered boxes (with a margin, in graph units) fill the view."""
    page.page.evaluate(
        """([ids, m]) => {
             const c = window.app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect();
             const boxes = ids.map((id) => document.querySelector(`[data-node-id="${id}"]`).getBoundingClientRect());
             const gx = (x) => (x - r.left) / ds.scale - ds.offset[0];
             const gy = (y) => (y - r.top) / ds.scale - ds.offset[1];
             const x0 = gx(Math.min(...boxes.map((b) => b.left))) - m, y0 = gy(Math.min(...boxes.map((b) => b.top))) - m;
             const x1 = gx(Math.max(...boxes.map((b) => b.right))) + m, y1 = gy(Math.max(...boxes.map((b) => b.bottom))) + m;
             c.animateToBounds([x0, y0, x1 - x0, y1 - y0]);
           }""", [[str(i) for i in node_ids], margin])
    page.page.wait_for_timeout(1500)
