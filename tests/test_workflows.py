"""Shipped workflows: UI/API twins are current, and every node type and widget value is valid for the schemas
the real server reports (/object_info)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
MODEL_FILE_INPUTS = {"ckpt_name", "unet_name"}  # their options are the files installed on each machine


def test_workflow_twins_are_generated_and_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_workflows.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in UI_WORKFLOWS} == {p.name for p in (ROOT / "workflows" / "api").glob("*.json")}


def widget_problems(workflow: dict, object_info: dict) -> list:
    """Unknown node types and widget values outside their schema, for a UI-format workflow."""
    problems = []
    for n in workflow["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        schema = object_info.get(n["type"])
        if schema is None:
            problems.append(f"node {n['id']}: unknown node type {n['type']}")
            continue
        inputs = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
        linked = {i["name"] for i in n.get("inputs", [])}
        widgets = [name for name, spec in inputs.items() if name not in linked
                   and (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))]
        values = list(n.get("widgets_values", []))
        for name in widgets:
            spec = inputs[name]
            options = spec[1] if len(spec) > 1 else {}
            if not values:
                problems.append(f"node {n['id']} {n['type']}: no value for widget {name}")
                break
            value = values.pop(0)
            if options.get("control_after_generate"):
                values.pop(0)  # the UI stores the "fixed/randomize" choice right after the value
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            if choices is not None:
                if name not in MODEL_FILE_INPUTS and value not in choices:
                    problems.append(f"node {n['id']} {n['type']}: {name}={value!r} not in {choices}")
            elif spec[0] in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"node {n['id']} {n['type']}: {name}={value!r} out of range")
        if values:
            problems.append(f"node {n['id']} {n['type']}: {len(values)} widget values too many")
    return problems


@pytest.mark.comfy_server
def test_workflows_match_server_schemas(comfy_server):
    info = comfy_server.object_info()
    for path in UI_WORKFLOWS:
        assert widget_problems(json.loads(path.read_text()), info) == [], path.name


@pytest.mark.comfy_server
def test_checker_catches_broken_workflows(comfy_server):
    info = comfy_server.object_info()
    wf = json.loads((ROOT / "workflows" / "lowbit_rtn_quantize_and_generate.json").read_text())
    quantize = next(n for n in wf["nodes"] if n["type"] == "LowBitQuantizeUNet")
    quantize["widgets_values"][0] = "nf4"
    wf["nodes"].append({"id": 99, "type": "LowBitDoesNotExist", "widgets_values": []})
    problems = widget_problems(wf, info)
    assert any("'nf4' not in" in p for p in problems) and any("unknown node type" in p for p in problems)
