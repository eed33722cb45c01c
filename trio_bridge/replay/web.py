"""``serve --web DIR``: noVNC (or any web client in DIR) and the replay on one port.

A request that asks for a WebSocket is a replay client; any other GET is answered here,
before websockets' handshake (its ``process_request`` hook):

- ``/`` and ``/replay.html``: a page with the client (``vnc.html``, noVNC's page, set to
  connect back to this port) and the replay's controls: pause, resume, speed;
- ``/replay/pause``, ``/replay/resume``, ``/replay/speed?x=2``, ``/replay/state``: the
  controls themselves (JSON state in reply), for the page or for ``curl``;
- anything else: a file under DIR (never outside it).
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.trio.server import ServerConnection

from .control import PlaybackControl

CLIENT_PAGE = "vnc.html?autoconnect=true&resize=scale&reconnect=false&path=websockify"
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html"}

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>trio-bridge replay: {title}</title>
<style>
  body {{ margin: 0; display: flex; flex-direction: column; height: 100vh; font: 14px sans-serif; }}
  #bar {{ padding: 4px 8px; background: #333; color: #eee; display: flex; gap: 8px; }}
  iframe {{ flex: 1; border: 0; }}
</style></head>
<body>
<div id="bar">
  <button id="pause">Pause</button><button id="resume">Resume</button>
  <label>Speed <select id="speed">{speeds}</select></label>
  <span id="state"></span><span>{title}</span>
</div>
<iframe id="client" src="{client}"></iframe>
<script>
  const state = document.getElementById('state');
  async function call(what) {{
    const s = await (await fetch('replay/' + what)).json();
    state.textContent = (s.paused ? 'paused' : 'playing') + ' at ' + s.speed + 'x';
    document.getElementById('speed').value = String(s.speed);
  }}
  document.getElementById('pause').onclick = () => call('pause');
  document.getElementById('resume').onclick = () => call('resume');
  document.getElementById('speed').onchange = e => call('speed?x=' + e.target.value);
  call('state');
</script>
</body></html>
"""
SPEEDS = (0.25, 0.5, 1, 2, 4, 8)


class WebFiles:
    """Answers the HTTP requests of ``serve --web`` (see the module doc)."""

    def __init__(self, root: Path, control: PlaybackControl, title: str) -> None:
        self.root = root.resolve()
        self.control = control
        self.title = title

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if "websocket" in request.headers.get("Upgrade", "").lower():
            return None  # a replay client: on to the handshake
        url = urlsplit(request.path)
        if url.path in ("/", "/replay.html"):
            return _response(200, self._page().encode(), "text/html; charset=utf-8")
        if url.path.startswith("/replay/"):
            return self._control(url.path.removeprefix("/replay/"), parse_qs(url.query))
        return self._file(url.path)

    def _page(self) -> str:
        speeds = "".join(
            f'<option value="{s:g}"{" selected" if s == self.control.speed else ""}>{s:g}x</option>'
            for s in sorted({*SPEEDS, self.control.speed})
        )
        title = self.title.replace("&", "&amp;").replace("<", "&lt;")
        return PAGE.format(title=title, speeds=speeds, client=CLIENT_PAGE)

    def _control(self, action: str, query: dict[str, list[str]]) -> Response:
        control = self.control
        try:
            if action == "pause":
                control.pause()
            elif action == "resume":
                control.resume()
            elif action == "speed":
                control.set_speed(float(query["x"][0]))
            elif action != "state":
                return _response(404, b"no such control\n", "text/plain")
        except (KeyError, ValueError):
            return _response(400, b"speed?x= needs a number greater than 0\n", "text/plain")
        state = {"paused": control.paused, "speed": control.speed}
        return _response(200, json.dumps(state).encode(), "application/json")

    def _file(self, path: str) -> Response:
        target = (self.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return _response(404, b"not found\n", "text/plain")
        kind = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
        return _response(200, target.read_bytes(), kind or "application/octet-stream")


def _response(status: int, body: bytes, content_type: str) -> Response:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found"}
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, reasons[status], headers, body)
