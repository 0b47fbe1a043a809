#!/usr/bin/env python3
"""Screenshot of a report.html with headless Chromium, for the docs and the README.

    python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 6000] [--no-trim]

Chromium's --screenshot captures the window, not the page, so the window is made taller than any report
(--height) and the blank bottom is cut off afterwards (Pillow, which matplotlib brings); --no-trim keeps it.
The page is self-contained (ftlab.report.html), and Chromium runs with every network path closed: a proxy on a
closed local port for any http(s) fetch, no background/component/sync traffic, a throwaway profile. As root
(containers) Chromium's sandbox cannot start, so --no-sandbox is added then.

Needs a Chromium: `apt-get install -y chromium` (Debian/Ubuntu), or --chromium PATH / $CHROMIUM."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(given: str | None = None) -> str:
    for cand in (given, os.environ.get("CHROMIUM"), *NAMES):
        if cand and (path := shutil.which(cand)):
            return path
    sys.exit("screenshot_report: no Chromium found (tried --chromium, $CHROMIUM, " + ", ".join(NAMES)
             + "): install one, e.g. `apt-get install -y chromium`")


def chromium_command(chromium: str, html: Path, png: Path, width: int, height: int, profile: str) -> list[str]:
    cmd = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--window-size={width},{height}", f"--screenshot={png}", f"--user-data-dir={profile}",
           # no network: anything that tries http(s) hits a closed port; no updater, sync or metrics traffic
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
           "--no-first-run", "--no-default-browser-check", "--metrics-recording-only", "--mute-audio",
           "--disable-dev-shm-usage"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--no-sandbox")
    return cmd + [html.resolve().as_uri()]


def trim_bottom(png: Path, margin: int = 24) -> tuple[int, int]:
    """Cut the blank rows below the page's last content (plus `margin`); returns the new (width, height)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    bg = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, bg).getbbox()
    if box is None:
        raise SystemExit(f"screenshot_report: {png} is blank (did the page load? see Chromium's output above)")
    bottom = min(rgb.height, box[3] + margin)
    rgb.crop((0, 0, rgb.width, bottom)).save(png)
    return rgb.width, bottom


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 6000, trim: bool = True,
               chromium: str | None = None, timeout: float = 120.0) -> tuple[int, int]:
    html, png = Path(html), Path(png).resolve()
    if not html.is_file():
        raise SystemExit(f"screenshot_report: {html} is not a file: give the report.html that `ftlab report` wrote")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # a stale picture must not pass for a new one
    exe = find_chromium(chromium)
    with tempfile.TemporaryDirectory(prefix="ftlab-chromium-") as profile:
        p = subprocess.run(chromium_command(exe, html, png, width, height, profile), capture_output=True, text=True,
                           timeout=timeout)
    if p.returncode != 0 or not png.is_file():
        raise SystemExit(f"screenshot_report: Chromium exited {p.returncode} without writing {png}:\n"
                         + (p.stderr or p.stdout)[-2000:])
    if trim:
        return trim_bottom(png)
    from PIL import Image

    with Image.open(png) as im:
        return im.size


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="report.html (self-contained, as ftlab report writes it)")
    ap.add_argument("png", type=Path, help="where the screenshot goes")
    ap.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    ap.add_argument("--height", type=int, default=6000,
                    help="window height: taller than the page, the blank rest is trimmed (default 6000)")
    ap.add_argument("--no-trim", action="store_true", help="keep the full window height")
    ap.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, then chromium on PATH)")
    args = ap.parse_args(argv)
    if args.width < 200 or args.height < 200:
        ap.error("--width and --height: at least 200 pixels")
    w, h = screenshot(args.html, args.png, args.width, args.height, not args.no_trim, args.chromium)
    print(f"{args.png}: {w}x{h}")


if __name__ == "__main__":
    main()
