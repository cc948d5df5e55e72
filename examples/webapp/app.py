#!/usr/bin/env python3
"""A small web application (standard library only) that runs hostqueue jobs and streams
their progress to the browser with Server-Sent Events.

    python examples/webapp/app.py --port 8000          # then open http://127.0.0.1:8000/

Routes:
    GET  /                  the page: a button that submits a job and shows its progress
    POST /jobs              submit: JSON body {"name", "steps", "delay"}; replies {"id", ...}
    GET  /jobs/ID           the job (JSON)
    GET  /jobs/ID/events    its events as an SSE stream (text/event-stream), read from the
                            job's watch stream; the stream ends after the final event

Without --socket the app embeds its own supervisor (hostqueue.Supervisor) with the
task module next to it; with --socket it uses a running `hostqueue run
--tasks examples/webapp/webtasks.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(HERE, "..", "..", "hostqueue")):
    sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..")))  # a checkout

import hostqueue  # noqa: E402

TASK = "webtasks.report"
FINAL = ("completed", "failed", "cancelled", "expired")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hostqueue web example</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 2em; max-width: 40em; }
 .job { margin: .6em 0; } progress { width: 20em; }
 .done { color: #070; } .bad { color: #a00; }
</style></head>
<body>
<h1>hostqueue: jobs with live progress</h1>
<form id="f">
  steps <input name="steps" type="number" value="10" min="1" max="100">
  delay <input name="delay" type="number" value="0.3" step="0.1" min="0" max="5"> s
  <button>Start a job</button>
</form>
<div id="jobs"></div>
<script>
document.getElementById("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const reply = await fetch("/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({steps: Number(form.get("steps")), delay: Number(form.get("delay"))})});
  const job = await reply.json();
  if (!reply.ok) { alert(job.error); return; }
  const row = document.createElement("div");
  row.className = "job";
  row.innerHTML = `job ${job.id} <progress max="1" value="0"></progress> <span>pending</span>`;
  document.getElementById("jobs").prepend(row);
  const bar = row.querySelector("progress"), text = row.querySelector("span");
  const source = new EventSource(job.events);
  source.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.event === "progress") { bar.value = ev.progress; text.textContent = ev.message || ""; }
    else if (ev.event === "completed") {
      bar.value = 1; text.textContent = "done: " + JSON.stringify(ev.job.result);
      text.className = "done"; source.close();
    } else if (["failed", "cancelled", "expired"].includes(ev.event)) {
      text.textContent = ev.event + ": " + ((ev.job.error || {}).message || "");
      text.className = "bad"; source.close();
    } else { text.textContent = ev.event; }
  };
});
</script>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    server: App
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def client(self) -> hostqueue.Client:
        # One Client per request: a Client is not shared between threads.
        return hostqueue.Client(self.server.socket_path, timeout=10)

    def send_json(self, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/":
            body = PAGE.encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        m = re.fullmatch(r"/jobs/(\d+)(/events)?", self.path)
        if not m:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "no such page"})
            return
        job_id = int(m.group(1))
        try:
            if m.group(2):
                self.stream_events(job_id)
            else:
                with self.client() as c:
                    self.send_json(HTTPStatus.OK, c.get(job_id))
        except hostqueue.ProtocolError as exc:
            status = HTTPStatus.NOT_FOUND if exc.code == "not_found" else HTTPStatus.BAD_REQUEST
            self.send_json(status, {"error": exc.message, "code": exc.code})
        except hostqueue.SupervisorUnavailable as exc:
            self.send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

    def stream_events(self, job_id: int) -> None:
        """The job's watch stream as Server-Sent Events, until its final event."""
        with self.client() as c:
            c.timeout = None  # a watch waits as long as the job runs
            events = c.watch(job_id=job_id)  # raises not_found before any header is sent
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends with the job
            self.end_headers()
            self.close_connection = True
            try:
                self.wfile.write(b"retry: 10000\n\n")
                for event in events:
                    event.pop("id", None)  # the watch request's id: nothing for the browser
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away; closing the Client ends the watch

    def do_POST(self) -> None:
        if self.path != "/jobs":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "no such page"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            args = {k: body[k] for k in ("name", "steps", "delay") if k in body}
            with self.client() as c:
                job = c.submit(TASK, args)
        except (ValueError, hostqueue.ProtocolError) as exc:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except hostqueue.SupervisorUnavailable as exc:
            self.send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        self.send_json(HTTPStatus.CREATED, {"id": job.id, "status": job.job["status"],
                                            "events": f"/jobs/{job.id}/events"})


class App(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], socket_path: str, quiet: bool) -> None:
        super().__init__(address, Handler)
        self.socket_path = socket_path
        self.quiet = quiet


def serve(host: str, port: int, socket_path: str, quiet: bool) -> None:
    app = App((host, port), socket_path, quiet)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=app.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving on http://{host}:{app.server_address[1]}/", flush=True)
    try:
        app.serve_forever()
    finally:
        app.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--socket", help="a running supervisor's socket (default: embed one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no request log")
    opts = parser.parse_args()
    if opts.socket:
        serve(opts.host, opts.port, opts.socket, opts.quiet)
        return 0
    with tempfile.TemporaryDirectory(prefix="hq-web-") as work:
        with hostqueue.Supervisor(store=os.path.join(work, "jobs.db"), workers=opts.workers,
                                  tasks=[os.path.join(HERE, "webtasks.py")],
                                  log_level="warning") as sup:
            serve(opts.host, opts.port, sup.socket, opts.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
