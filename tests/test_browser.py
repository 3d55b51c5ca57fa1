"""The standalone GGUF tab in a real chromium, driven by Playwright.

Serves the tab on a free 127.0.0.1 port (``serve(block=False)``), sets a per-format
LoRA option and saves it, reloads the page, inspects the sample model, and checks
what the page shows against gguf-py's own reading of the file. Saves a screenshot
to ``artifacts/gguf_tab.png``.

Needs playwright and gradio (requirements-test.txt) and Debian's chromium
(``apt-get install -y chromium``, at /usr/bin/chromium, or $CHROMIUM): without them
the file fails with what to install (deselect it with ``-m "not browser"``).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

import gradio  # noqa: E402,F401  (requirements-test.txt)
from playwright import sync_api  # noqa: E402  (requirements-test.txt)

if not Path(CHROMIUM).exists():
    pytest.fail(f"test_browser: no chromium at {CHROMIUM}: apt-get install -y chromium, or set $CHROMIUM "
                "(or deselect the browser tests with -m 'not browser')", pytrace=False)

sys.path.insert(0, str(Path(__file__).parent))
from test_ui import reference_listing, write_reference_gguf  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The standalone tab on a free port, with the built-in sample model when
    lib_gguf can write it (else no model)."""
    from gguf_tab import app, common, options as tab_options

    tmp = tmp_path_factory.mktemp("browser")
    os.environ[common.CACHE_ENV] = str(tmp / "cache")
    common.set_host(None)
    options = tmp / "options.json"
    port = free_port()
    demo = app.serve(port=port, model=None, block=False, options_path=options)
    try:
        yield types.SimpleNamespace(options_module=tab_options, url=f"http://127.0.0.1:{port}", options=options,
                                    tmp=tmp, model=Path(common.loaded_model()))
    finally:
        demo.close()
        os.environ.pop(common.CACHE_ENV, None)
        tab_options.set_options_file(None)
        common.set_loaded_model(None)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(20_000)
    page.goto(served.url)
    page.locator("#gguf_mode_Q4_K").wait_for()
    yield page
    page.close()


def screenshot(page, name):
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / name), full_page=True)


def test_only_on_localhost(served):
    assert served.url.startswith("http://127.0.0.1:")
    port = int(served.url.rsplit(":", 1)[1])
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for addr in addrs:  # not reachable on the machine's other addresses
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((addr, port)) != 0, f"the tab answers on {addr}"


def test_per_format_option_saved_and_shown_after_reload(page, served):
    expect = sync_api.expect
    page.locator("#gguf_mode_Q4_K").get_by_label("merge", exact=True).check()
    page.locator("#gguf_mode_Q8_0").get_by_label("run-time", exact=True).check()
    page.locator("#gguf_opt_save").click()
    expect(page.locator("#gguf_opt_status")).to_contain_text("Saved")
    saved = json.loads(served.options.read_text())
    assert saved["mode_by_format"] == {"Q4_K": "merge", "Q8_0": "runtime"}
    assert served.options_module.load_options()["mode_by_format"] == saved["mode_by_format"]
    page.reload()
    expect(page.locator("#gguf_mode_Q4_K").get_by_label("merge", exact=True)).to_be_checked()
    expect(page.locator("#gguf_mode_Q8_0").get_by_label("run-time", exact=True)).to_be_checked()
    expect(page.locator("#gguf_mode_Q5_K").get_by_label("default", exact=True)).to_be_checked()
    screenshot(page, "gguf_tab_options.png")


def test_inspect_the_sample_model(page, served):
    expect = sync_api.expect
    model = served.model
    assert model.exists() and model.suffix == ".gguf"
    ref = reference_listing(model)
    counts = {}
    for fmt, _, _ in ref.values():
        counts[fmt] = counts.get(fmt, 0) + 1

    page.get_by_role("tab", name="Inspect").click()
    path_box = page.locator("#gguf_inspect_path textarea, #gguf_inspect_path input").first
    expect(path_box).to_have_value(str(model))
    page.locator("#gguf_inspect_btn").click()
    summary = page.locator("#gguf_inspect_summary")
    expect(summary).to_contain_text(f"{len(ref)} tensors")
    hist_rows = page.locator("#gguf_inspect_hist table tbody tr")
    expect(hist_rows).to_have_count(len(counts))
    shown = {}
    for i in range(hist_rows.count()):
        cells = [c.strip() for c in hist_rows.nth(i).locator("td").all_inner_texts()]
        shown[cells[0]] = int(cells[1])
    assert shown == counts
    assert len(shown) >= 2 and any(f not in ("F32", "F16", "BF16") for f in shown)  # quantized layers
    expect(page.locator("#gguf_inspect_table")).to_contain_text("double_blocks.0.img_attn.qkv.weight")
    screenshot(page, "gguf_tab.png")

    # an error is shown in the page, not a traceback
    path_box.fill(str(model.parent / "missing.gguf"))
    page.locator("#gguf_inspect_btn").click()
    expect(summary).to_contain_text("not found")
    assert "Traceback" not in summary.inner_text()


def test_convert_in_the_page(page, served):
    from safetensors.torch import save_file

    from lib_gguf.sample import tiny_flux_state_dict

    expect = sync_api.expect
    src = served.tmp / "flux.safetensors"
    save_file(tiny_flux_state_dict(), str(src))
    page.get_by_role("tab", name="Convert").click()
    page.locator("#gguf_convert_src textarea, #gguf_convert_src input").first.fill(str(src))
    page.locator("#gguf_convert_btn").click()
    out = page.locator("#gguf_convert_out")
    expect(out).to_contain_text("Done.", timeout=60_000)
    dst = served.tmp / "flux-Q4_K_S.gguf"
    assert dst.exists()
    assert str(len(reference_listing(dst))) + " tensors" in out.inner_text()
    # a bad source: the message, not a traceback
    page.locator("#gguf_convert_src textarea, #gguf_convert_src input").first.fill(str(served.tmp / "nope.safetensors"))
    page.locator("#gguf_convert_btn").click()
    expect(out).to_contain_text("not found")
