#!/usr/bin/env python3
"""Make a few sample images, thumbnail them as hostqueue jobs, show a progress bar each.

    python examples/thumbnails/run.py                      # its own embedded supervisor
    python examples/thumbnails/run.py --socket ./jobs.sock # a running `hostqueue run
                                                           #   --tasks examples/thumbnails/thumbs.py`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # thumbs.py, for make_sample
if __package__ is None and os.path.isdir(os.path.join(HERE, "..", "..", "hostqueue")):
    sys.path.insert(1, os.path.abspath(os.path.join(HERE, "..", "..")))  # a checkout

import hostqueue  # noqa: E402
from thumbs import make_sample  # noqa: E402

FINAL = ("completed", "failed", "cancelled", "expired")


def bar(fraction: float, width: int = 30) -> str:
    done = int(round(fraction * width))
    return "#" * done + "-" * (width - done)


class Bars:
    """One line per job; redrawn in place on a terminal, printed as lines otherwise."""

    def __init__(self, names: dict[int, str], out: Any = sys.stdout) -> None:
        self.names = names
        self.state = {job_id: (0.0, "pending") for job_id in names}
        self.out = out
        self.tty = out.isatty()
        self.drawn = False

    def update(self, job_id: int, fraction: float | None, text: str) -> None:
        old_fraction, old_text = self.state[job_id]
        fraction = old_fraction if fraction is None else fraction
        if not self.tty and int(fraction * 4) == int(old_fraction * 4) and text == old_text:
            return  # a log gets quarter steps, not every row
        self.state[job_id] = (fraction, text)
        if self.tty:
            self.draw()
        else:
            print(self.line(job_id), file=self.out, flush=True)

    def line(self, job_id: int) -> str:
        fraction, text = self.state[job_id]
        return f"{self.names[job_id]:<14} [{bar(fraction)}] {fraction * 100:5.1f}% {text}"

    def draw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{len(self.names)}F")
        for job_id in self.names:
            self.out.write("\x1b[2K" + self.line(job_id) + "\n")
        self.out.flush()
        self.drawn = True


def run(socket: str, count: int, size: tuple[int, int], width: int, out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    sources = []
    for i in range(count):
        src = os.path.join(out_dir, f"image-{i + 1}.ppm")
        make_sample(src, size[0], size[1], seed=i)
        sources.append(src)
    run_id = f"thumbs-{uuid.uuid4().hex[:8]}"
    with hostqueue.Client(socket) as watcher, hostqueue.Client(socket) as client:
        # Watch first, so that no event of these jobs is missed.
        events = watcher.watch(run_id=run_id)
        jobs = client.submit_many(
            "thumbs.thumbnail",
            [{"src": s, "dst": s[:-4] + ".thumb.ppm", "width": width} for s in sources],
            run_id=run_id,
        )
        bars = Bars({j.id: os.path.basename(s) for j, s in zip(jobs, sources)})
        ended: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 300
        while len(ended) < len(jobs) and time.monotonic() < deadline:
            event = events.next_event(timeout=1.0)
            if event is None:
                continue
            job_id, kind = event["job_id"], event["event"]
            if job_id not in bars.names:
                continue
            if kind == "progress":
                bars.update(job_id, event.get("progress"), event.get("message") or "")
            elif kind in FINAL:
                ended[job_id] = event["job"]
                bars.update(job_id, 1.0 if kind == "completed" else None, kind)
            else:
                bars.update(job_id, None, kind)
        events.close()
    ok = 0
    for job in jobs:
        final = ended.get(job.id) or job.refresh()
        if final["status"] == "completed":
            r = final["result"]
            print(f"{os.path.basename(r['dst'])}: {r['width']}x{r['height']} "
                  f"(from {r['source'][0]}x{r['source'][1]})")
            ok += 1
        else:
            print(f"job {job.id} {final['status']}: {(final.get('error') or {}).get('message')}")
    print(f"{ok} of {len(jobs)} thumbnails in {out_dir}")
    return 0 if ok == len(jobs) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="a running supervisor's socket (default: start one here)")
    parser.add_argument("--count", type=int, default=4, help="images to make (default 4)")
    parser.add_argument("--size", default="480x360", help="their size (default 480x360)")
    parser.add_argument("--width", type=int, default=96, help="thumbnail width (default 96)")
    parser.add_argument("--out", help="directory for the images (default: a temporary one)")
    opts = parser.parse_args()
    size = tuple(int(v) for v in opts.size.lower().split("x"))
    assert len(size) == 2, "--size is WIDTHxHEIGHT"
    out_dir = opts.out or tempfile.mkdtemp(prefix="thumbs-")
    if opts.socket:
        return run(opts.socket, opts.count, (size[0], size[1]), opts.width, out_dir)
    with tempfile.TemporaryDirectory(prefix="hq-thumbs-") as work:
        print(f"starting a supervisor with 2 workers on {work}/jobs.db", flush=True)
        with hostqueue.Supervisor(store=os.path.join(work, "jobs.db"),
                                  tasks=[os.path.join(HERE, "thumbs.py")], workers=2,
                                  log_level="warning") as sup:
            return run(sup.socket, opts.count, (size[0], size[1]), opts.width, out_dir)


if __name__ == "__main__":
    sys.exit(main())
