"""Drive a real, headless ComfyUI server (``<repo>/.comfyui/main.py``, or $LOWBIT_COMFYUI) from the bench
(``bench demo --sdxl``) and the tests, and load the API-format workflows of ``<repo>/workflows/api`` to POST to it.

Everything is loopback-only and uses the stdlib for HTTP; the optional
websocket helper uses ``aiohttp`` (a ComfyUI dependency).

    srv = ComfyServer(checkpoint=sdxl_random_checkpoint())
    srv.start()
    hist = srv.run(prompt, timeout=600)
    pngs = srv.output_files(hist)
    srv.stop()
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from ..testbed.model import comfy_root  # noqa: F401  (re-exported: the tests' comfy_env uses it)

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
HOST = "127.0.0.1"
MODEL_DIRS = ("checkpoints", "diffusion_models", "loras", "controlnet")


def venv_python() -> str:
    """Interpreter for the server process (the repo venv if present, else the current one)."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def load_api_workflow(name: str, **overrides) -> dict:
    """Load ``<repo>/workflows/api/<name>.json`` (ComfyUI API format).

    ``overrides`` set node inputs: ``node_id__input_name=value`` (e.g.
    ``**{"3__steps": 2}``) or ``node_id={"input": value, ...}``.
    """
    path = REPO_ROOT / "workflows" / "api" / (name if name.endswith(".json") else f"{name}.json")
    with open(path) as f:
        prompt = json.load(f)
    return apply_overrides(prompt, **overrides)


def apply_overrides(prompt: dict, **overrides) -> dict:
    for key, value in overrides.items():
        if "__" in key:
            node_id, inp = key.split("__", 1)
            updates = {inp: value}
        else:
            node_id, updates = key, value
            if not isinstance(updates, dict):
                raise TypeError(f"override {key!r} must be a dict of inputs or use node__input")
        if node_id not in prompt:
            raise KeyError(f"node {node_id!r} not in workflow (nodes: {sorted(prompt)})")
        prompt[node_id].setdefault("inputs", {}).update(updates)
    return prompt


class ComfyServerError(RuntimeError):
    """Server failed to start / died / HTTP failure. ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = ""):
        self.log_tail = log_tail
        if log_tail:
            message = f"{message}\n----- ComfyUI log tail -----\n{log_tail}"
        super().__init__(message)


class ComfyPromptError(ComfyServerError):
    """POST /prompt answered 400 (validation failed). ``error`` / ``node_errors`` as sent by ComfyUI."""

    def __init__(self, error, node_errors, log_tail: str = ""):
        self.error = error
        self.node_errors = node_errors
        msg = error.get("message", error) if isinstance(error, dict) else error
        details = error.get("details", "") if isinstance(error, dict) else ""
        super().__init__(
            f"prompt rejected: {msg} {details}\nnode_errors: {json.dumps(node_errors, indent=1, default=str)}",
            log_tail,
        )


class ComfyExecutionError(ComfyServerError):
    """The prompt ran and failed; fields copied from ComfyUI's ``execution_error`` message."""

    def __init__(self, prompt_id, message: dict, log_tail: str = ""):
        self.prompt_id = prompt_id
        self.details = message
        self.node_id = message.get("node_id")
        self.node_type = message.get("node_type")
        self.exception_type = message.get("exception_type")
        self.exception_message = message.get("exception_message")
        tb = "".join(message.get("traceback") or [])
        super().__init__(
            f"prompt {prompt_id} failed in node {self.node_id} ({self.node_type}): "
            f"{self.exception_type}: {self.exception_message}\n{tb}",
            log_tail,
        )


class ComfyInterrupted(ComfyExecutionError):
    """The prompt was interrupted (``execution_interrupted``)."""


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process in a temporary base directory.

    Layout under ``base_dir``: ``models/{checkpoints,diffusion_models,loras,controlnet}``,
    ``output`` (+ ``output/diffusion_models`` and ``output/checkpoints``, also search paths of their kind),
    ``input``, ``user``, ``temp``, ``extra_model_paths.yaml``, ``comfyui.log``.
    ``checkpoint`` is symlinked as ``models/checkpoints/sdxl_random.safetensors``.
    """

    def __init__(self, checkpoint: Optional[os.PathLike] = None, base_dir: Optional[os.PathLike] = None,
                 port: Optional[int] = None, extra_args: Sequence[str] = (), python: Optional[str] = None,
                 env: Optional[dict] = None, checkpoint_name: str = "sdxl_random.safetensors",
                 launcher: Sequence[str] = ()):
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="lowbit-comfy-"))
        self.port = port
        self.extra_args = list(extra_args)
        self.launcher = list(launcher)  # a script (+ its args) that runs main.py, e.g. simulated_vram_main.py
        self.python = python or venv_python()
        self.env = env
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.checkpoint_name = checkpoint_name
        self.proc: Optional[subprocess.Popen] = None
        self._log_fh = None
        self.startup_seconds: Optional[float] = None

    # ---- paths ---------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def temp_dir(self) -> Path:
        """ComfyUI's temp folder: it appends ``temp`` to ``--temp-directory``."""
        return self.base_dir / "temp" / "temp"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    def models_dir(self, kind: str = "checkpoints") -> Path:
        """Temp model folder for ``checkpoints``/``diffusion_models``/``loras``/``controlnet``."""
        return self.base_dir / "models" / kind

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- lifecycle -----------------------------------------------------
    def _prepare_dirs(self) -> Path:
        for kind in MODEL_DIRS:
            self.models_dir(kind).mkdir(parents=True, exist_ok=True)
        for d in (self.output_dir, self.output_dir / "diffusion_models", self.output_dir / "checkpoints",
                  self.input_dir, self.user_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.checkpoint is not None:
            link = self.models_dir("checkpoints") / self.checkpoint_name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.checkpoint.resolve())
        paths = {kind: [self.models_dir(kind)] for kind in MODEL_DIRS}
        paths["diffusion_models"].append(self.output_dir / "diffusion_models")
        paths["checkpoints"].append(self.output_dir / "checkpoints")  # LowBitSaveCheckpoint's one-file checkpoints
        lines = ["lowbit_tests:"]
        for kind, dirs in paths.items():
            lines.append(f"  {kind}: |")
            lines += [f"    {d.resolve()}" for d in dirs]
        yaml_path = self.base_dir / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n")
        return yaml_path

    def command(self, yaml_path: Path) -> List[str]:
        return [
            self.python, *self.launcher, str(comfy_root() / "main.py"), "--cpu",
            "--listen", HOST, "--port", str(self.port), "--disable-auto-launch",
            "--extra-model-paths-config", str(yaml_path),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--user-directory", str(self.user_dir), "--temp-directory", str(self.base_dir / "temp"),
            "--database-url", "sqlite:///:memory:",  # default DB lives inside the shared .comfyui/user
            *self.extra_args,
        ]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.proc is not None:
            raise ComfyServerError("server already started")
        yaml_path = self._prepare_dirs()
        fixed_port = self.port is not None
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port()
            env = dict(os.environ)
            env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
                        "TOKENIZERS_PARALLELISM": "false"})
            env.update(self.env or {})
            self._log_fh = open(self.log_path, "ab")
            self._log_fh.write(f"### {' '.join(self.command(yaml_path))}\n".encode())
            self._log_fh.flush()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command(yaml_path), cwd=str(comfy_root()), stdout=self._log_fh,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
            try:
                self._wait_ready(timeout)
                self.startup_seconds = time.perf_counter() - t0
                return self
            except ComfyServerError as e:
                in_use = "address already in use" in self.log_text().lower()
                self.stop(cleanup=False)
                if fixed_port or not in_use or attempt == 2:
                    raise e
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} during startup",
                                       self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(f"ComfyUI not ready after {timeout:.0f}s", self.log_tail())
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, cleanup: bool = True, timeout: float = 20.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL on its process group); remove the temp base dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if cleanup and self._own_base and os.environ.get("LOWBIT_KEEP_SERVER_DIR") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- HTTP ----------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 60.0):
        """JSON request; returns (status, parsed JSON or text). 4xx/5xx do not raise."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            raise ComfyServerError(f"{method} {path} failed: {e!r} (server alive: {self.alive()})",
                                   self.log_tail()) from e
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def get_json(self, path: str, timeout: float = 60.0):
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} -> {status}: {data}", self.log_tail())
        return data

    def object_info(self, node_class: Optional[str] = None) -> dict:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self.get_json(path)

    def queue(self, prompt: dict, client_id: Optional[str] = None, prompt_id: Optional[str] = None) -> str:
        """POST /prompt; returns the prompt_id. Raises ComfyPromptError with node_errors on 400."""
        body = {"prompt": prompt, "prompt_id": prompt_id or str(uuid.uuid4())}
        if client_id:
            body["client_id"] = client_id
        status, data = self.request("POST", "/prompt", body)
        if status == 400 and isinstance(data, dict):
            raise ComfyPromptError(data.get("error"), data.get("node_errors"), self.log_tail(30))
        if status != 200 or not isinstance(data, dict) or "prompt_id" not in data:
            raise ComfyServerError(f"POST /prompt -> {status}: {data}", self.log_tail())
        return data["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        data = self.get_json(f"/history/{prompt_id}")
        return data.get(prompt_id) if isinstance(data, dict) else None

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Poll /history until the prompt finished; return its history entry or raise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                entry = self.history(prompt_id)
            except ComfyServerError:
                if not self.alive():
                    raise
                # alive but not answering: a node holds the GIL (e.g. reading a multi-GB file); poll again
                entry = None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    self._raise_for_status(prompt_id, status)
                    return entry
            if not self.alive():
                raise ComfyServerError(f"ComfyUI died while running prompt {prompt_id}", self.log_tail())
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f}s "
                                       f"(queue: {self.get_json('/queue')})", self.log_tail())
            time.sleep(poll)

    def _raise_for_status(self, prompt_id: str, status: dict) -> None:
        if status.get("status_str") == "success":
            return
        for kind, msg in status.get("messages") or []:
            if kind == "execution_error":
                raise ComfyExecutionError(prompt_id, msg, self.log_tail(40))
            if kind == "execution_interrupted":
                raise ComfyInterrupted(prompt_id, {**msg, "exception_type": "interrupted",
                                                   "exception_message": "execution interrupted"})
        if status.get("status_str") == "error":
            raise ComfyExecutionError(prompt_id, {"exception_message": f"unknown failure: {status}"},
                                      self.log_tail(40))

    def run(self, prompt: dict, timeout: float = 600.0, client_id: Optional[str] = None) -> dict:
        return self.wait(self.queue(prompt, client_id=client_id), timeout=timeout)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        body = {"prompt_id": prompt_id} if prompt_id else {}
        status, data = self.request("POST", "/interrupt", body)
        if status != 200:
            raise ComfyServerError(f"POST /interrupt -> {status}: {data}", self.log_tail())

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: ask ComfyUI to unload models (takes effect when the queue is idle)."""
        self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def clear_queue(self) -> None:
        self.request("POST", "/queue", {"clear": True})

    def output_files(self, history: dict, kinds: Iterable[str] = ("images",)) -> List[Path]:
        """Files listed in a history entry's outputs (default: images), as paths on disk."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in (history.get("outputs") or {}).values():
            for kind in kinds:
                for item in node_out.get(kind) or []:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    root = roots.get(item.get("type", "output"), self.output_dir)
                    files.append(root / item.get("subfolder", "") / item["filename"])
        return files

    # ---- websocket -----------------------------------------------------
    def ws_connect(self, client_id: Optional[str] = None, timeout: float = 30.0) -> "WsCollector":
        """Open ``/ws?clientId=...`` and collect messages in a background thread (call ``.close()``)."""
        return WsCollector(self, client_id or uuid.uuid4().hex).start(timeout)

    def ws_events(self, prompt: dict, timeout: float = 600.0,
                  types: Optional[Iterable[str]] = ("progress", "executing")):
        """Run ``prompt`` while listening on the websocket.

        Returns ``(history, events)``; events are the JSON messages (``{"type", "data"}``)
        of this prompt whose type is in ``types`` (all types if None), in arrival order.
        """
        with self.ws_connect() as ws:
            pid = self.queue(prompt, client_id=ws.client_id)
            try:
                hist = self.wait(pid, timeout=timeout)
            finally:
                # final "executing" {node: None} is sent right after the history entry is written
                ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None
                            and m["data"].get("prompt_id") == pid, timeout=10, raise_on_timeout=False)
            return hist, ws.events(prompt_id=pid, types=types)


class WsCollector:
    """Collects ComfyUI websocket JSON messages (binary preview frames are recorded as size only)."""

    def __init__(self, server: ComfyServer, client_id: str):
        self.server = server
        self.client_id = client_id
        self.messages: List[dict] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._error: Optional[BaseException] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ws = None
        self._thread: Optional[threading.Thread] = None

    def start(self, timeout: float = 30.0) -> "WsCollector":
        self._thread = threading.Thread(target=self._run, name=f"comfy-ws-{self.client_id[:8]}", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout) or self._error is not None:
            self.close()
            raise ComfyServerError(f"websocket connect failed: {self._error!r}", self.server.log_tail())
        return self

    def _run(self):
        import aiohttp

        async def main():
            self._loop = asyncio.get_running_loop()
            url = f"ws://{HOST}:{self.server.port}/ws?clientId={self.client_id}"
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url, max_msg_size=0, heartbeat=None) as ws:
                    self._ws = ws
                    self._connected.set()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            item = json.loads(msg.data)
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            item = {"type": "binary", "data": {"size": len(msg.data)}}
                        else:
                            break
                        item.setdefault("data", {})
                        with self._cond:
                            self.messages.append(item)
                            self._cond.notify_all()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported via start()/wait_for
            self._error = e
        finally:
            self._connected.set()
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0,
                 raise_on_timeout: bool = True) -> Optional[dict]:
        """Block until a message satisfies ``predicate`` (already received ones count)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0 or (self._thread is not None and not self._thread.is_alive()):
                    if raise_on_timeout:
                        raise TimeoutError(f"no matching websocket message after {timeout}s "
                                           f"({len(self.messages)} received, error={self._error!r})")
                    return None
                self._cond.wait(min(left, 0.5))

    def events(self, prompt_id: Optional[str] = None, types: Optional[Iterable[str]] = None) -> List[dict]:
        types = set(types) if types is not None else None
        with self._cond:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            if types is not None and m.get("type") not in types:
                continue
            if prompt_id is not None and m["data"].get("prompt_id") != prompt_id:
                continue
            out.append(m)
        return out

    def close(self) -> None:
        if self._loop is not None and self._ws is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(5)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
