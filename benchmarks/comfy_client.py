"""A ComfyUI server driven over HTTP, as a user's browser drives it: start it on a folder of its own, turn a saved
workflow (UI format) into a prompt with the server's own ``/object_info``, ``POST /prompt`` and wait in
``/history``. Used by ``benchmarks/e2e_fullscale.py``'s ``comfy`` phase; ComfyUI itself is not part of this
repository (fetch ``Comfy-Org/ComfyUI`` and give its folder)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: Input types ComfyUI shows as widgets (values in a saved workflow's ``widgets_values``); a list is a combo.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py`` of the ComfyUI checkout ``comfy`` with every folder (models, input, output, custom_nodes,
    user) under ``base`` and an empty frontend folder: the API alone, nothing of the checkout touched."""

    def __init__(self, comfy: Path, base: Path, python: str, log_path: Path, cpu: bool, env: dict[str, str],
                 extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        frontend = base / "frontend"
        frontend.mkdir(parents=True, exist_ok=True)
        (frontend / "index.html").write_text("<!doctype html><title>API only</title>")
        cmd = [python, str(comfy / "main.py"), "--base-directory", str(base), "--listen", "127.0.0.1", "--port",
               str(self.port), "--front-end-root", str(frontend), "--disable-auto-launch"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*cmd, *(["--cpu"] if cpu else []), *extra], cwd=comfy, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})

    def get(self, path: str) -> Any:
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def post(self, path: str, data: dict) -> Any:
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            return json.loads(urllib.request.urlopen(req, timeout=60).read())
        except urllib.error.HTTPError as exc:  # ComfyUI's validation errors come back as the body of a 400
            raise RuntimeError(f"POST {path}: {exc.code} {exc.read().decode()[:3000]}") from None

    def wait_ready(self, deadline: float) -> float:
        """Seconds until the server answers ``/object_info`` (custom nodes loaded); raises past ``deadline``."""
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting (see its log)")
            try:
                self.get("/object_info")
                return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                time.sleep(0.5)
        raise TimeoutError("ComfyUI did not answer before the deadline")

    def run(self, prompt: dict, deadline: float) -> dict:
        """Queue ``prompt`` and wait for its history entry; returns it (``status``, ``outputs``)."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while running the prompt")
            time.sleep(1.0)
        raise TimeoutError("the prompt did not finish before the deadline")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def to_api(workflow: dict, info: dict, overrides: dict[str, dict[str, Any]]) -> dict:
    """A saved workflow (UI format) as a prompt: each node's widget values by input name (in ``/object_info``'s
    order), links as ``[node id, slot]``, then ``overrides[class_type]`` on top."""
    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        order = [(n, s) for section in ("required", "optional") for n, s in spec.get(section, {}).items()]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, s in order:
            kind, opts = s[0], (s[1] if len(s) > 1 else {})
            widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if widget and values:
                inputs[name] = values.pop(0)
                if kind == "INT" and opts.get("control_after_generate"):
                    values.pop(0)  # the saved "fixed" / "randomize" choice
            if name in linked:
                inputs[name] = [str(linked[name][0]), linked[name][1]]
        inputs.update(overrides.get(node["type"], {}))
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def node_defaults(info: dict, class_type: str) -> dict[str, Any]:
    """A new node's widget inputs at their defaults (a combo's first choice without one)."""
    spec = info[class_type]["input"]
    out = {}
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind, opts = s[0], (s[1] if len(s) > 1 else {})
            if isinstance(kind, list):
                out[name] = opts.get("default", kind[0] if kind else None)
            elif kind in WIDGET_TYPES and "default" in opts:
                out[name] = opts["default"]
    return out
