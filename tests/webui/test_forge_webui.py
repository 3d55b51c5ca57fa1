"""The extension inside the real Forge web UI, driven over its HTTP API.

    FORGE_DIR=/work/hosts/forge FORGE_PYTHON=/work/hosts/forge-venv/bin/python \\
        python -m pytest -q -m forge tests/webui/test_forge_webui.py

One throw-away copy of $FORGE_DIR per session (``host.WebUIHost``): this checkout cloned
into its ``extensions/`` (the working tree laid over), Forge's launcher running its
``install.py``, tiny random-weight Flux checkpoints (one GGUF per format), CLIP-L, T5, VAE
and a LoRA; one server for every test, killed at the end. Results go to
``artifacts/webui_forge.md`` and are printed.

FORGE_WEBUI_EXTENSION=0 runs the same checks on vanilla Forge (no extension): a check of
the harness itself; the infotext check is then not applicable. FORGE_WEBUI_FORMATS picks
formats (comma-separated); FORGE_WEBUI_WORKDIR keeps the copy and ``server.log``.

To add a check: write ``def check_NAME(host, fmt, row)`` below (it records into ``row``
and raises ``AssertionError`` on failure), add it to ``CHECKS`` and a column to
``COLUMNS``; or add a plain test that takes the ``forge`` fixture.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host as webui  # noqa: E402

pytestmark = [pytest.mark.forge]

# (kind, checkout variable, interpreter variable)
HOSTS = [("forge", "FORGE_DIR", "FORGE_PYTHON"), ("neo", "FORGE_NEO_DIR", "FORGE_NEO_PYTHON")]

FORMATS = [f for f in os.environ.get(
    "FORGE_WEBUI_FORMATS", "F16,Q8_0,Q4_0,Q4_1,Q4_K,Q5_K,Q6_K,IQ4_XS,IQ3_S").split(",") if f]
ARTIFACT = os.path.join(webui.ROOT, "artifacts", "webui_{kind}.md")
PROMPT = "a photo of a cat"

COLUMNS = [("format", "format"), ("loads", "loads"), ("lora_changes", "lora changes"),
           ("restore_exact", "restore exact"), ("infotext_mode", "infotext mode"),
           ("option_applies", "option applies next gen"), ("merge_vs_runtime", "merge vs run time"), ("merge_keeps", "merge keeps"), ("quant_err", "quant err"),
           ("paste_reproduces", "paste reproduces"), ("clear_restores", "clear restores"),
           ("switch_back_exact", "switch back exact"), ("rss_mb", "RSS MB"), ("seconds", "seconds"),
           ("error", "error")]


# ---- the host, once per module and kind ---------------------------------------------
@pytest.fixture(scope="module", params=[h[0] for h in HOSTS])
def forge(request):
    kind, dir_var, py_var = next(h for h in HOSTS if h[0] == request.param)
    if not os.environ.get(dir_var):
        pytest.skip(f"needs a {kind} checkout: set {dir_var} (and {py_var}, its interpreter)")
    h = webui.env_host(kind=kind, forge_dir=os.environ[dir_var],
                       python=os.environ.get(py_var) or os.environ.get("FORGE_PYTHON") or sys.executable)
    results: dict = {}
    h.results = results
    h.images = {}
    try:
        h.prepare(formats=list(dict.fromkeys(FORMATS + ["Q8_0", "Q4_0"])))  # a checkpoint to switch to
        h.start()
        if h.install_extension:
            assert h.extension_loaded(), (f"{webui.EXTENSION_NAME} is not loaded in the host: "
                                          f"extensions {h.extensions()}, scripts {h.scripts()}\n{h.log_tail(6000)}")
        yield h
    finally:
        h.stop()
        _write_table(h, results)
        if h.own_workdir and os.environ.get("FORGE_WEBUI_KEEP") != "1":
            h.cleanup()


def _write_table(h, results) -> None:
    if not results:
        return
    lines = [f"# {h.kind.name} web UI: GGUF checkpoints and a LoRA "
             f"({_what(h)})", "",
             f"Host: {h.forge_dir} (kind {h.kind.name}), python {h.python}; "
             f"launch {h.timings.get('start', 0):.1f} s, models {h.timings.get('models', 0):.1f} s; "
             "seconds = load + 11 generations (64x64, 1 step); merge vs run time = mean |merged - run-time| / "
             "mean |run-time - no LoRA| over the pixels; merge keeps = mean |merged - no LoRA| / the same for run time (at least 0.5); "
             "quant err = mean |no LoRA - F16's no LoRA| / the same (merged must be within 1.5x of it from run time, "
             "+0.5 levels)", "",
             "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for fmt in FORMATS:
        row = results.get(fmt)
        if row is None:
            continue
        lines.append("| " + " | ".join(_cell(row.get(k, "")) for k, _ in COLUMNS) + " |")
    details = [r for r in (results.get(f) for f in FORMATS) if r and r.get("trace")]
    if details:
        lines += ["", "## Errors", ""]
        for r in details:
            lines += [f"### {r['format']}", "", "```", r["trace"].rstrip(), "```", ""]
    text = "\n".join(lines) + "\n"
    path = ARTIFACT.format(kind=h.kind.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    print("\n" + text)


def _what(h) -> str:
    if not h.install_extension:
        return "WITHOUT forge-gguf-lora: vanilla Forge"
    import subprocess

    head = subprocess.run(["git", "-C", h.extension_src, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return f"with forge-gguf-lora {head}" + (" + working tree" if h.overlay_working_tree else " (HEAD only)")


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")[:160]


# ---- checks: each records into `row`, raises AssertionError on failure ----------------
def _load(h, fmt):
    h.set_options(sd_model_checkpoint=h.checkpoint(fmt), forge_additional_modules=h.modules(),
                  forge_unet_storage_dtype="Automatic")
    opts = h.options()
    assert opts["sd_model_checkpoint"].startswith(h.checkpoint(fmt)), opts["sd_model_checkpoint"]


def _lora_prompt(h):
    return f"{PROMPT} {h.lora_tag(0.8)}"


def check_lora_roundtrip(h, fmt, row):
    """Without LoRA, with ``<lora:...:0.8>``, without again (same seed): the LoRA changes
    the image, its removal gives the first image back exactly, and (with the extension)
    the infotext records the GGUF LoRA mode."""
    row["loads"] = False
    base = h.txt2img(prompt=PROMPT)
    row["loads"] = True
    lora = h.txt2img(prompt=_lora_prompt(h))
    again = h.txt2img(prompt=PROMPT)
    h.images[fmt] = {"base": base.pixels(), "lora": lora.pixels()}
    row["lora_changes"] = lora.pixels() != base.pixels()
    row["restore_exact"] = again.pixels() == base.pixels()
    mode = _infotext_value(lora.infotext, "GGUF LoRA")
    row["infotext_mode"] = mode if mode is not None else "-"
    assert row["lora_changes"], "the LoRA did not change the image"
    assert row["restore_exact"], "removing the LoRA did not give the no-LoRA image back exactly"
    if h.install_extension:
        assert "GGUF LoRA:" in lora.infotext, f"no 'GGUF LoRA:' in the infotext: {lora.infotext!r}"
        assert fmt in _modes(lora), lora.infotext


def _modes(r) -> dict:
    text = _infotext_value(r.infotext, "GGUF LoRA") or ""
    return dict(part.split(":", 1) for part in text.split(",") if ":" in part)


def _mean_diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(len(a), 1)


def check_options_and_paste(h, fmt, row):
    """The format's mode set in the options (as the tab and Settings store it) applies at
    the next generation with the same LoRA in the prompt; run time and merged change the
    image by the same amount within requantization error; a pasted infotext's modes
    reproduce the run-time image exactly, and clearing the field gives the options' mode
    back exactly."""
    if not h.install_extension:
        return
    key = f"gguf_lora_mode_{fmt}"
    try:
        h.set_options(**{key: "runtime"})
        rt = h.txt2img(prompt=_lora_prompt(h))
        h.set_options(**{key: "merge"})
        mg = h.txt2img(prompt=_lora_prompt(h))
        row["option_applies"] = _modes(rt).get(fmt) == "runtime" and _modes(mg).get(fmt) == "merge"
        assert row["option_applies"], (rt.infotext, mg.infotext)
        base = h.images[fmt]["base"]
        effect = _mean_diff(rt.pixels(), base)
        row["merge_vs_runtime"] = round(_mean_diff(mg.pixels(), rt.pixels()) / max(effect, 1e-9), 3)
        assert effect > 0 and _mean_diff(mg.pixels(), base) > 0
        # merged: the LoRA's effect (at least half of it in the image), up to requantizing
        # the weight once more: no further from run time than the format's own
        # quantization error (this checkpoint against the F16 one, same weights)
        row["merge_keeps"] = round(_mean_diff(mg.pixels(), base) / effect, 3)
        assert row["merge_keeps"] >= 0.5, row
        ref = h.images.get("F16", {}).get("base")
        if ref is not None and fmt != "F16":
            qerr = _mean_diff(base, ref)
            row["quant_err"] = round(qerr / effect, 3)
            assert _mean_diff(mg.pixels(), rt.pixels()) <= 1.5 * qerr + 0.5, row
        elif fmt == "F16":
            assert row["merge_vs_runtime"] <= 0.05, row  # a float merge: nothing requantized
        pasted = h.txt2img(prompt=_lora_prompt(h), alwayson_scripts={"GGUF LoRA": {"args": [f"{fmt}:runtime"]}})
        row["paste_reproduces"] = pasted.pixels() == rt.pixels() and _modes(pasted).get(fmt) == "runtime"
        cleared = h.txt2img(prompt=_lora_prompt(h), alwayson_scripts={"GGUF LoRA": {"args": [""]}})
        row["clear_restores"] = cleared.pixels() == mg.pixels() and _modes(cleared).get(fmt) == "merge"
        assert row["paste_reproduces"], pasted.infotext
        assert row["clear_restores"], cleared.infotext
    finally:
        h.set_options(**{key: "default"})


def check_switch_and_back(h, fmt, row):
    """Another checkpoint (with the LoRA), then this one again: the same images, bit for
    bit, with and without the LoRA (nothing of the other model or of the LoRA stays)."""
    other = next(f for f in FORMATS + ["Q8_0", "Q4_0"] if f != fmt)
    h.set_options(sd_model_checkpoint=h.checkpoint(other))
    h.txt2img(prompt=_lora_prompt(h))
    _load(h, fmt)
    back = h.txt2img(prompt=PROMPT)
    back_lora = h.txt2img(prompt=_lora_prompt(h))
    row["switch_back_exact"] = (back.pixels() == h.images[fmt]["base"]
                                and back_lora.pixels() == h.images[fmt]["lora"])
    row["rss_mb"] = round(webui.rss_mb(h))
    h.rss = getattr(h, "rss", []) + [row["rss_mb"]]
    assert row["switch_back_exact"], "switching checkpoints and back changed the images"


def _infotext_value(text: str, key: str):
    import re

    m = re.search(rf'(?:^|, ){re.escape(key)}: ("(?:[^"\\]|\\.)*"|[^,\n]*)', text, re.M)
    return m.group(1).strip('"') if m else None


CHECKS = [check_lora_roundtrip, check_options_and_paste, check_switch_and_back]


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_format(forge, fmt):
    row = {"format": fmt, "loads": False}
    forge.results[fmt] = row
    t = time.monotonic()
    log_at = forge.log_size()
    try:
        _load(forge, fmt)
        for check in CHECKS:
            check(forge, fmt, row)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        trace = ""
        for _ in range(30):  # the host may log its traceback just after it answers
            trace = _host_traceback(forge.log_since(log_at), _api_message(e))
            if trace or not isinstance(e, webui.HostError):
                break
            time.sleep(0.1)
        row["trace"] = trace or traceback.format_exc()
        raise
    finally:
        row["seconds"] = time.monotonic() - t
        if forge.proc is not None and forge.proc.poll() is not None:
            row["error"] = (row.get("error", "") + f" (host exited {forge.proc.returncode})").strip()


def _api_message(e: Exception) -> str:
    """The exception message in the web UI's JSON error answer (``"message":"..."``)."""
    import re

    m = re.search(r'"message":"((?:[^"\\]|\\.)*)"', str(e))
    return m.group(1).encode().decode("unicode_escape") if m else ""


def _host_traceback(log: str, message: str = "") -> str:
    """The host's traceback for this test's failure, from its log: the one whose exception
    line holds the API's error message (Forge's built-in scripts log their own, harmless
    ones on every API call), else the last one."""
    import re

    blocks = []
    starts = [m.start() for m in re.finditer(r"Traceback \(most recent call last\)", log)] + [len(log)]
    for a, b in zip(starts, starts[1:]):
        chunk = log[a:b]
        m = re.search(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*$", chunk, re.M)
        blocks.append(chunk[:m.end()] if m else chunk[:6000])
    if not blocks:
        return ""
    key = message.strip()[:60]
    found = blocks[-1]
    for blk in blocks:
        if key and key in blk.splitlines()[-1]:
            found = blk
            break
    return _drop_server_frames(found)


def _drop_server_frames(tb: str) -> str:
    """A traceback less the HTTP server's frames (uvicorn, starlette, fastapi, anyio, gradio)."""
    import re

    out, skip = [], False
    server = re.compile(r'^\s*File ".*/site-packages/(uvicorn|starlette|fastapi|anyio|gradio)/')
    for line in tb.splitlines():
        if line.lstrip().startswith("File "):
            skip = bool(server.match(line))
            if skip:
                continue
        elif skip:
            continue
        out.append(line)
    return "\n".join(out)


def test_memory_stays_flat_across_checkpoint_switches(forge):
    """Switching between two checkpoints with the LoRA, again and again, keeps the
    server's memory flat (the per-format checks above compile each format's kernels
    once, so their growth is not a leak: the rounds here start after that)."""
    pair = [f for f in FORMATS if f != "F16"][:2] or ["Q8_0", "Q4_0"]
    if len(pair) < 2:
        pair = [pair[0], "Q8_0" if pair[0] != "Q8_0" else "Q4_0"]

    def round_trip():
        for fmt in pair:
            _load(forge, fmt)
            forge.txt2img(prompt=_lora_prompt(forge))
            forge.txt2img(prompt=PROMPT)

    round_trip()  # warm: every model and kernel of the pair loaded once
    start = webui.rss_mb(forge)
    seen = [start]
    for _ in range(4):
        round_trip()
        seen.append(webui.rss_mb(forge))
    assert seen[-1] - start <= 48, [round(x) for x in seen]


def test_settings_are_in_the_api_and_the_backend_says_it_is_registered(forge):
    """GET /sdapi/v1/options lists the extension's settings (POST takes them), and the
    console says once at startup that the backend is registered."""
    if not forge.install_extension:
        pytest.skip("vanilla host")
    opts = forge.options()
    ours = {k: v for k, v in opts.items() if k.startswith("gguf_lora_")}
    assert "gguf_lora_mode_Q4_K" in ours and "gguf_lora_default_gguf_mode" in ours, sorted(opts)[:50]
    sys.path.insert(0, webui.ROOT)
    from lib_gguf import get_format

    offered = [k[len("gguf_lora_mode_"):] for k in ours if k.startswith("gguf_lora_mode_")]
    assert offered and all(get_format(f).can_dequantize for f in offered), offered  # only what loads
    forge.set_options(gguf_lora_mode_Q4_K="merge")
    try:
        assert forge.options()["gguf_lora_mode_Q4_K"] == "merge"
    finally:
        forge.set_options(gguf_lora_mode_Q4_K="default")
    log = forge.log_since(0)
    assert log.count("forge-gguf-lora: GGUF backend registered") == 1, log[-4000:]


def test_the_settings_page_and_the_tab_agree_in_a_browser(forge):
    """In the host's own page (Debian's chromium, Playwright): a mode saved in the GGUF
    tab shows on Settings -> GGUF LoRA at once, "Apply settings" keeps it (it used to
    write the page's stale "default" back), and a mode applied there shows in the tab."""
    if not forge.install_extension:
        pytest.skip("vanilla host")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        pytest.skip(f"no chromium at {chromium} (apt-get install -y chromium)")
    key = "gguf_lora_mode_Q4_K"
    shot = os.path.join(webui.ROOT, "artifacts", f"webui_{forge.kind.name}_settings.png")
    forge.set_options(**{key: "default"})
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(forge.url, timeout=120_000)
            page.get_by_role("tab", name="GGUF", exact=True).click(timeout=60_000)
            page.locator("#gguf_mode_Q4_K").get_by_label("merge", exact=True).check()
            page.locator("#gguf_opt_save").click()
            page.locator("#gguf_opt_status").get_by_text("Saved").wait_for(timeout=30_000)
            assert forge.options()[key] == "merge"
            page.get_by_role("tab", name="Settings", exact=True).click()
            page.locator("#settings").get_by_text("GGUF LoRA", exact=True).first.click()
            setting = page.locator(f"#setting_{key}")
            setting.get_by_label("merge", exact=True).wait_for(state="visible", timeout=30_000)
            assert setting.get_by_label("merge", exact=True).is_checked(), "Settings shows a stale value"
            page.locator("#settings_submit").click()
            page.wait_for_timeout(2000)
            assert forge.options()[key] == "merge", "Apply settings wrote a stale value back"
            setting.get_by_label("run-time", exact=True).check()
            page.locator("#settings_submit").click()
            page.wait_for_timeout(2000)
            assert forge.options()[key] == "runtime"
            os.makedirs(os.path.dirname(shot), exist_ok=True)
            page.screenshot(path=shot, full_page=False)
            page.get_by_role("tab", name="GGUF", exact=True).click()
            assert page.locator("#gguf_mode_Q4_K").get_by_label("run-time", exact=True).is_checked(), \
                "the tab does not show what Settings applied"
            browser.close()
    finally:
        forge.set_options(**{key: "default"})
