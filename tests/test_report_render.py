"""ftlab report's rendering: every plot is a PNG for normal and edge inputs, report.html is one well-formed,
self-contained page with every image embedded, the wandb run holds the tables and images (read back from the
offline .wandb file with wandb's own protobuf records), and the screenshot script renders a page headlessly."""

import base64
import glob
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from ftlab.report import html as rhtml  # noqa: E402
from ftlab.report import plots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, checked against what matplotlib decodes."""
    import matplotlib.image as mpimg

    assert isinstance(data, bytes) and data[:8] == PNG, data[:16]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[:2] == (h, w) and w > 50 and h > 50
    return w, h


def points(n_groups=3, per_group=3):
    pts = []
    for g in range(n_groups):
        for k in range(per_group):
            pts.append({"label": f"m{g} lr{k}", "group": f"m{g}", "gain": 10.0 * g + 3 * k, "forgetting": 2.0 * g + k,
                        "gain_err": 0.5 if k else None, "forgetting_err": None if g else 0.3, "selected": k == 1})
    return pts


PLACEHOLDER = None


def placeholder_size():
    global PLACEHOLDER
    if PLACEHOLDER is None:
        PLACEHOLDER = png_size(plots._placeholder("t", "why"))
    return PLACEHOLDER


def test_every_plot_is_a_png():
    pts = points()
    cases = {
        "gain_forgetting": plots.gain_forgetting(pts, ["m0 lr1", "m2 lr1"], title="gain vs forgetting"),
        "task_heatmap": plots.task_heatmap(["lora", "full"], ["arc", "hellaswag", "wino"],
                                           [[1.5, -3.25, None], [-10.0, 0.0, 2.0]], title="per-task delta"),
        "training_curves": plots.training_curves(
            {"lora": [{"step": 0, "loss": None, "probe_ppl": 9.0}] + [{"step": s, "loss": 3.0 / s} for s in (1, 2, 4)],
             "full": [{"step": s, "loss": 2.0 / s, "probe_ppl": 8.0 + s} for s in (1, 2, 3)]}, title="loss"),
        "matched_gain": plots.matched_gain({"lora": [(0, 0), (5, 1), (9, 2.5)], "full": [(0, 0), (6, 3), (12, 8)]},
                                           [3.0, 6.0], title="forgetting at matched gain"),
        "r_matrix": plots.r_matrix([[80.0, None], [70.5, 90.0]], ["add", "rev"], title="R"),
        "update_profile": plots.update_profile({"lora": [(0, 0.01), (1, 0.03), (2, 0.02)], "full": [(1, 0.2), (0, 0.1)]},
                                               title="per-layer update"),
    }
    for name, png in cases.items():
        assert png_size(png) != placeholder_size(), name  # a real figure, not the "no data" one


def test_edge_inputs_draw_or_say_no_data():
    # single point, every error None, no Pareto front
    one = [{"label": "only", "gain": 1.0, "forgetting": -0.5, "gain_err": None, "forgetting_err": None,
            "selected": True, "group": "g"}]
    assert png_size(plots.gain_forgetting(one, [])) != placeholder_size()
    assert png_size(plots.gain_forgetting(one, ["only"])) != placeholder_size()
    assert png_size(plots.training_curves({"a": [{"step": 3, "loss": 1.0}]})) != placeholder_size()
    assert png_size(plots.task_heatmap(["a"], ["t"], [[2.0]])) != placeholder_size()
    assert png_size(plots.r_matrix([[5.0]], ["a"])) != placeholder_size()
    # nothing to draw: a placeholder saying so (documented in ftlab/report/plots.py), never an empty axis
    empties = [plots.gain_forgetting([], []), plots.training_curves({}), plots.training_curves({"a": []}),
               plots.training_curves({"a": [{"step": 1, "acc": 1.0}]}, key="loss"),
               plots.matched_gain({"a": []}, [1.0]), plots.r_matrix([], []), plots.update_profile({}),
               plots.task_heatmap(["a"], ["t"], [[None]]), plots.task_heatmap([], [], [])]
    for png in empties:
        assert png_size(png) == placeholder_size()


@pytest.mark.parametrize("call, message", [
    (lambda: plots.gain_forgetting(points(), ["nope"]), "pareto_labels ['nope'] name no point"),
    (lambda: plots.gain_forgetting([{"label": "a", "gain": None, "forgetting": 1.0}], []), "point 'a' gain is None"),
    (lambda: plots.gain_forgetting([{"label": "a", "gain": "3", "forgetting": 1.0}], []), "is not a number"),
    (lambda: plots.gain_forgetting([{"gain": 1.0, "forgetting": 1.0}], []), "points[0] needs a dict with a 'label'"),
    (lambda: plots.gain_forgetting([{"label": "a", "gain": 1.0, "forgetting": 1.0}] * 2, []), "labels ['a'] name more"),
    (lambda: plots.task_heatmap(["a", "b"], ["t"], [[1.0]]), "1 rows of values for 2 row labels"),
    (lambda: plots.task_heatmap(["a"], ["t", "u"], [[1.0]]), "row 0 has 1 values for 2 columns"),
    (lambda: plots.r_matrix([[1.0, 2.0], [3.0]], ["a", "b"]), "row 1 has 1 values"),
    (lambda: plots.training_curves({"a": [{"loss": 1.0}]}), "each row needs a 'step'"),
    (lambda: plots.matched_gain({"a": [(1.0,)]}, []), "give pairs"),
    (lambda: plots.matched_gain({"a": [(1.0, 2.0)]}, [float("inf")]), "levels[0]"),
    (lambda: plots.update_profile({"a": [("3", 0.1)]}), "layer index must be an int"),
])
def test_malformed_input_is_refused_with_what_is_wrong(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


def _pixels(png: bytes, rgb: tuple[float, float, float], tol: float = 0.02) -> int:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    return int((np.abs(img - np.array(rgb)).max(axis=-1) < tol).sum())


def test_a_missing_heatmap_value_is_blank_not_a_colour():
    """A None cell (and a NaN) is left white: drawn as a value it would take the colormap's lowest colour, and the
    count of that colour would double."""
    from matplotlib import colormaps

    low = colormaps["viridis"](0.0)[:3]
    both = _pixels(plots.r_matrix([[1.0, 1.0]], ["a", "b"]), low)
    for missing in (None, float("nan")):
        one = _pixels(plots.r_matrix([[1.0, missing]], ["a", "b"]), low)
        assert 0 < one < 0.6 * both, (missing, one, both)


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.tags, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append((tag, self.getpos()))

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def sample_page() -> tuple[str, int]:
    """A report page from fixture numbers (every plot kind, a table with text that needs escaping): what the
    screenshot test renders, and what docs/report.md's rendering section shows how to capture."""
    pts = points()
    gf = plots.gain_forgetting(pts, ["m0 lr1", "m1 lr1", "m2 lr1"], title="gain vs forgetting (selected lr)")
    heat = plots.task_heatmap(["m0", "m1", "m2"], ["arc_easy", "hellaswag", "winogrande", "piqa"],
                              [[0.5, -1.25, None, 2.0], [-4.0, -2.5, -0.5, 0.0], [-9.0, -6.0, -3.5, -1.0]],
                              title="per-task delta (points)")
    curves = plots.training_curves({f"m{g}": [{"step": s, "loss": (3.0 - g * 0.4) / (1 + s / 10)} for s in range(0, 60, 5)]
                                    for g in range(3)}, title="training loss")
    mg = plots.matched_gain({f"m{g}": [(x, (g + 1) * 0.05 * x * x / 10) for x in range(0, 25, 3)] for g in range(3)},
                            [5.0, 10.0, 15.0], title="forgetting at matched gain")
    rm = plots.r_matrix([[88.0, 10.0, 12.0], [61.0, 92.0, 11.0], [55.5, 70.0, 95.0]], ["add", "rev", "copy"],
                        title="continual R matrix")
    up = plots.update_profile({f"m{g}": [(k, 0.01 * (g + 1) * (1 + k % 3)) for k in range(8)] for g in range(3)},
                              title="per-layer relative update")
    table = rhtml.table_html(["method", "lr", "gain", "forgetting", "n", "note"],
                             [["m0", 1e-4, 3.0, 1.0, 3, "<selected> & best"], ["m1", 3e-4, 13.0, 3.0, 3, None],
                              ["m2", 0.003, 23.456, 5.0, 3, "p < 0.05"]])
    sections = [{"heading": "Summary", "html": table, "images": [("gain vs forgetting", gf)]},
                {"heading": "Per task", "html": "<p>deltas in points</p>", "images": [("per-task deltas", heat)]},
                {"heading": "Curves & <trajectories>", "html": "",
                 "images": [("loss", curves), ("matched gain", mg)]},
                {"heading": "Continual", "images": [("R", rm)]},
                {"heading": "Diagnostics", "images": [("update profile", up)]}]
    return rhtml.build_html("ftlab report: <fixture> comparison", sections), 6


def test_html_is_well_formed_self_contained_and_embeds_every_image():
    page, n_images = sample_page()
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    ET.fromstring(page.split("\n", 1)[1])  # what build_html writes is XML too (the doctype line aside)
    assert len(c.imgs) == n_images
    for img in c.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png_size(base64.b64decode(img["src"][len(prefix):], validate=True))
        assert img["alt"]
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page
    # escaped: the title, the heading and the cells are text, not markup
    assert "script" not in c.tags and "selected" not in c.tags and "trajectories" not in c.tags
    text = "".join(c.text)
    assert "ftlab report: <fixture> comparison" in text and "<selected> & best" in text and "p < 0.05" in text
    assert "Curves & <trajectories>" in text


def test_table_cells_are_formatted_and_escaped():
    t = rhtml.table_html(["a", "b"], [["<b>x</b>", 1.23456], [None, 12], [True, 1.5e-4], [float("nan"), 123456.7]])
    root = ET.fromstring(t)
    cells = [[td.text for td in tr] for tr in root.iter("tr")][1:]
    assert cells == [["<b>x</b>", "1.23"], ["\u2013", "12"], ["true", "0.00015"], ["nan", "123,457"]]
    assert [td.get("class") for td in root.iter("td")] == [None, "num", None, "num", None, "num", "num", "num"]
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 columns"):
        rhtml.table_html(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="is not PNG bytes"):
        rhtml.build_html("t", [{"heading": "h", "images": [("c", b"GIF89a")]}])


def read_wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-log framing (7-byte header ':W&B' + magic + version, 32 KiB
    blocks of crc32c/length/type chunks) around wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST
            r = pb.Record()
            r.ParseFromString(buf)
            records.append(r)
            buf = b""
    return records


def test_wandb_offline_run_holds_the_tables_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from ftlab.report.wandb_log import log_report

    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default is offline
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    png = plots.r_matrix([[1.0, 2.0], [3.0, 4.0]], ["a", "b"])
    rows = [["lora", 1.5, None, "ok"], ["full", 2.0, 3.0, "-"]]
    run_dir = Path(log_report({"comparison": (["method", "gain", "forgetting", "note"], rows)}, {"r_matrix": png},
                              name="cmp", dir=tmp_path / "wb"))
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-") and tmp_path / "wb" in run_dir.parents
    (wandb_file,) = glob.glob(str(run_dir / "run-*.wandb"))
    records = read_wandb_records(Path(wandb_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "cmp" and run.project == "ftlab-report"
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                keys = list(item.nested_key) or [item.key]
                logged.setdefault(keys[0], {})[keys[-1]] = json.loads(item.value_json)
    table, image = logged["comparison"], logged["r_matrix"]
    assert table["_type"] == "table-file" and table["nrows"] == 2 and table["ncols"] == 4
    on_disk = json.loads((run_dir / "files" / table["path"]).read_text())
    assert on_disk["columns"] == ["method", "gain", "forgetting", "note"] and on_disk["data"] == rows
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert (run_dir / "files" / image["path"]).read_bytes() == png  # the exact bytes, not a re-encoding
    assert (image["width"], image["height"]) == png_size(png)


def test_wandb_mode_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    from ftlab.report.wandb_log import log_report

    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(ValueError, match="WANDB_MODE='offlin': give one of offline, online"):
        log_report({}, {}, dir=tmp_path / "wb")
    with pytest.raises(ValueError, match=r"images\['x'\] is not PNG bytes"):
        log_report({}, {"x": b"not a png"}, dir=tmp_path / "wb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_report({"t": (["a"], [[1]])}, {}, dir=tmp_path / "wb") == ""
    assert not (tmp_path / "wb").exists()


@pytest.mark.skipif(not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome"))
                    and os.environ.get("FTLAB_REQUIRE_CHROMIUM") != "1",  # CI installs it: absence fails there
                    reason="no Chromium (apt-get install -y chromium); scripts/screenshot_report.py needs one")
def test_screenshot_script_renders_the_page_headless(tmp_path):
    page, _ = sample_page()
    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    out = tmp_path / "shot" / "report.png"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(html), str(out),
                        "--width", "1000", "--height", "5000"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    w, h = png_size(out.read_bytes())
    # the page was laid out and the blank bottom trimmed: six figures stack far past one screen, not to 5000
    assert w == 1000 and 1200 < h < 5000, (w, h)
    # the embedded plots were drawn: viridis' darkest purple (the R matrix) is on the screenshot
    from matplotlib import colormaps

    assert _pixels(out.read_bytes(), colormaps["viridis"](0.0)[:3], tol=0.03) > 200
