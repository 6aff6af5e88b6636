"""The explorer driven in a real browser (headless chromium through Selenium): load the page,
pick an example, click a head cell, click a word and compare the box overlay with the Trace,
type a caption, export. One screenshot per view goes to the test's tmp dir (and to
$VALUE_JAX_SCREENSHOTS when set: how docs/explore/*.png are made)."""

from __future__ import annotations

import base64
import csv
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from value_jax.viz import views
from value_jax.viz.store import Store

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "bottom_up_attention"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def driver():
    pytest.importorskip("selenium")
    browser, chromedriver = _chromium(), shutil.which("chromedriver")
    if not browser or not chromedriver:
        pytest.skip(
            "no chromium/chromedriver on PATH (CI installs Debian's chromium and "
            "chromium-driver: apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        "--enable-unsafe-swiftshader",
    ):
        opts.add_argument(arg)
    opts.binary_location = browser
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _serve(store, session, export_dir):
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from value_jax.viz.app import make_app, serve

    return serve(make_app(store, session, export_dir=str(export_dir)), port=0)


def _wait(fn, timeout=60.0, what="condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # the page may be mid-update
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _plot(driver, graph_id, expr):
    return driver.execute_script(
        f"const gd=document.querySelector('#{graph_id} .js-plotly-plot'); return {expr};"
    )


def _shot(driver, element_id, name, tmp_path):
    el = driver.find_element("id", element_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    time.sleep(0.3)
    path = tmp_path / f"{name}.png"
    el.screenshot(str(path))
    out = os.environ.get("VALUE_JAX_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, f"{name}.png"))
    assert path.stat().st_size > 2000
    return path


def _click_xpath(driver, xpath):
    el = _wait(lambda: driver.find_element("xpath", xpath), what=xpath)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def _overlay_rows(driver):
    """(opacity, weight) of every region trace of the overlay figure, read from the page."""
    return _plot(
        driver,
        "overlay",
        "gd.data.filter(t => t.name !== 'source').map(t => [t.opacity, t.customdata[0][1]])",
    )


def _token(driver, i):
    return f'//span[@id=\'{{"index":{i},"type":"token"}}\']'


def test_explorer_in_chromium(driver, tmp_path, lxmert_built):
    shutil.copytree(lxmert_built.store_dir, tmp_path / "store")
    store = Store(tmp_path / "store")
    server = _serve(store, lxmert_built.session, tmp_path / "export")
    try:
        driver.get(server.url)
        _wait(
            lambda: (
                driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
                >= 4
            ),
            what="4 plots",
        )

        # Pick an example with a key word that names a drawn box.
        example, pos, word = next(
            (i, p, t)
            for i in range(1, len(store))
            for p, t in enumerate(store.record(i)["tokens"])
            if any(t in lab.split()[1:] for lab in store.record(i)["regions"])
        )
        caption = store.examples[example]["caption"]
        _click_xpath(driver, "//*[@id='example']")
        _click_xpath(
            driver, f"//*[@role='option' and starts-with(normalize-space(.), '{example}: ')]"
        )
        _wait(lambda: driver.find_element("id", "caption").text == caption, what="caption")
        _shot(driver, "example-picker", "example_picker", tmp_path)

        # Switch the statistic to VL-InterpreT's cross-modal mean, then to VALUE's coreference
        # T→V max attention (the demo's default).
        _click_xpath(driver, "//*[@id='stat']")
        _click_xpath(driver, "//*[@role='option' and contains(., 'cross-modal')]")
        _wait(
            lambda: "cross-modal" in _plot(driver, "head-summary", "gd.layout.title.text"),
            what="cross-modal statistic",
        )
        _click_xpath(driver, "//*[@id='stat']")
        _click_xpath(driver, "//*[@role='option' and contains(., 'coreference T→V')]")
        _wait(
            lambda: "coreference T→V" in _plot(driver, "head-summary", "gd.layout.title.text"),
            what="coref statistic",
        )

        # Click the head-summary cell (cross1.l2v, head 2): the planted head.
        xy = _wait(
            lambda: _plot(
                driver,
                "head-summary",
                "(() => {const fl=gd._fullLayout; return [fl._size.l + "
                "fl.xaxis.l2p(fl.xaxis.d2l('2')), fl._size.t + "
                "fl.yaxis.l2p(fl.yaxis.d2l('cross1.l2v')), "
                "gd.getBoundingClientRect().width, "
                "gd.getBoundingClientRect().height];})()",
            ),
            what="heatmap",
        )
        from selenium.webdriver.common.action_chains import ActionChains

        gd = driver.find_element("css selector", "#head-summary .js-plotly-plot")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", gd)
        ActionChains(driver).move_to_element(gd).move_by_offset(
            int(xy[0] - xy[2] / 2), int(xy[1] - xy[3] / 2)
        ).click().perform()
        _wait(
            lambda: (
                "head 2" in driver.find_element("id", "head").text
                and "cross1.l2v" in driver.find_element("id", "map").text
            ),
            what="head selected",
        )
        _shot(driver, "head-summary", "head_summary", tmp_path)

        # Click the word: the overlay's opacities become its attention row in the Trace.
        before = _overlay_rows(driver)
        _click_xpath(driver, _token(driver, pos))
        trace, _ = lxmert_built.trace(example)
        n_reg = store.examples[example]["n_regions"]
        row = np.asarray(trace.attention["cross1.l2v"][0, 1, pos, :n_reg], np.float64)

        def updated():
            rows = np.asarray(_overlay_rows(driver), np.float64)
            if rows.shape != (n_reg, 2) or np.allclose(rows[:, 1], np.asarray(before)[:, 1]):
                return None
            return (rows,)

        (rows,) = _wait(updated, what="overlay update")
        np.testing.assert_allclose(rows[:, 1], row, atol=2e-3)
        np.testing.assert_allclose(rows[:, 0], views.overlay_alpha(row), atol=1e-2)
        labels = store.record(example)["regions"]
        assert word in labels[int(np.argmax(rows[:, 1]))].split()
        colours = driver.find_element("xpath", _token(driver, pos)).get_attribute("style")
        assert "solid blue" in colours.replace("2px ", "")
        _shot(driver, "attention-view", "attention_from_token", tmp_path)
        _shot(driver, "matrix", "attention_matrix", tmp_path)
        # Click a token in the hidden-state projection: its nearest neighbours across examples.
        xy = _plot(
            driver,
            "hidden",
            "(() => {const fl=gd._fullLayout, t=gd._fullData[0]; return ["
            "fl._size.l + fl.xaxis.l2p(t.x[0]), fl._size.t + "
            "fl.yaxis.l2p(t.y[0]), gd.getBoundingClientRect().width, "
            "gd.getBoundingClientRect().height];})()",
        )
        gd = driver.find_element("css selector", "#hidden .js-plotly-plot")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", gd)
        ActionChains(driver).move_to_element(gd).move_by_offset(
            int(xy[0] - xy[2] / 2), int(xy[1] - xy[3] / 2)
        ).click().perform()
        items = _wait(
            lambda: driver.find_elements("css selector", "#neighbours li"),
            what="nearest neighbours",
        )
        assert all("in example" in li.text for li in items)
        _shot(driver, "hidden-view", "hidden_states", tmp_path)

        # Play steps through the tokens.
        _click_xpath(driver, "//*[@id='play']")
        _wait(
            lambda: (
                "solid blue"
                not in driver.find_element("xpath", _token(driver, pos))
                .get_attribute("style")
                .replace("2px ", "")
            ),
            what="play to move on",
            timeout=30,
        )
        _click_xpath(driver, "//*[@id='play']")

        # Type a caption for this image: it runs through the model and joins the list.
        box = driver.find_element("id", "new-caption")
        box.send_keys(f"a {word} near the lake")
        _click_xpath(driver, "//*[@id='add-caption']")
        _wait(
            lambda: "added example" in driver.find_element("id", "add-status").text,
            what="typed caption",
            timeout=120,
        )
        assert len(store) == len(lxmert_built.infos) + 1
        _wait(
            lambda: (
                word in driver.find_element("id", "words").text
                and "near" in driver.find_element("id", "words").text
            ),
            what="typed caption shown",
        )
        assert store.examples[-1]["image_id"] == store.examples[example]["image_id"]

        # Export: PNG (matplotlib, no browser needed) plus data and HTML.
        _click_xpath(driver, "//*[@id='export']")
        status = _wait(
            lambda: (
                "wrote" in driver.find_element("id", "export-status").text
                and driver.find_element("id", "export-status").text
            ),
            what="export",
            timeout=120,
        )
        pngs = [line for line in status.splitlines() if line.endswith(".png")]
        assert pngs and all(Path(p).is_file() for p in pngs)
        html = [line for line in status.splitlines() if line.endswith(".html")][0]

        # The exported page works from disk with no server.
        server.shutdown()
        server = None
        driver.get("file://" + html)
        _wait(lambda: driver.execute_script("return window.explorer !== undefined"), what="html")
        typed = store.record(len(store) - 1)  # [CLS] a <word> near the lake [SEP]
        assert typed["tokens"][2] == word
        got = driver.execute_script(
            "explorer.state.map='cross1.l2v'; explorer.state.head='1'; explorer.state.kind='text';"
            "explorer.state.pos=2; explorer.draw(); return Array.from(explorer.row().regions);"
        )
        want = typed["attention"]["cross1.l2v"][1, 2].astype(np.float64)
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert word in typed["regions"][int(np.argmax(want))].split()  # the typed word finds it
        _shot(driver, "wrap", "html_export", tmp_path)
    finally:
        if server is not None:
            server.shutdown()


def _tsv_boxes(path):
    """(image id, height, width, boxes [N, 4]) per row of an LXMERT TSV, parsed here."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path, newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            n = int(row[7])
            boxes = np.frombuffer(base64.b64decode(row[8]), np.float32).reshape(n, 4)
            out.append((row[0], int(row[1]), int(row[2]), boxes))
    return out


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present (real COCO sample)")
def test_real_coco_boxes_sit_at_tsv_pixels(driver, tmp_path):
    import jax
    from PIL import Image

    from value_jax.data.tokenization import WordPieceTokenizer
    from value_jax.models import LxmertConfig, build_model, init_params
    from value_jax.viz import compute, sources

    tsv = REAL / "coco_train2014_obj36_sample.tsv"
    rows = _tsv_boxes(tsv)[:2]
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"{i}\ta photo of a street with people\n" for i, *_ in rows))
    vocab = REAL.parent / "bert_base_uncased" / "vocab.txt"
    config = LxmertConfig.tiny(vocab_size=30522, visual_feat_dim=2048)
    model = build_model(config, outputs=())
    params = init_params(model, jax.random.PRNGKey(0))
    tok = WordPieceTokenizer(vocab, True)
    regions = sources.open_regions(str(tsv), str(REAL / "objects_vocab.txt"))
    infos = sources.caption_examples(str(captions), regions, tok, str(REAL / "images"))
    compute.write_store(compute.Session(model, params, tok, regions), infos, tmp_path / "store")
    store = Store(tmp_path / "store")
    server = _serve(store, None, tmp_path / "export")
    try:
        for k, (image_id, height, width, boxes) in enumerate(rows):
            info = store.examples[k]
            assert info["image_id"] == image_id and Path(info["image"]).is_file()
            with Image.open(info["image"]) as im:
                assert im.size == (width, height)
            driver.get(server.url)
            if k:
                _click_xpath(driver, "//*[@id='example']")
                _click_xpath(
                    driver, f"//*[@role='option' and starts-with(normalize-space(.), '{k}: ')]"
                )
            _wait(
                lambda info=info, k=k: (
                    driver.find_element("id", "caption").text == info["caption"]
                    and _plot(driver, "overlay", "gd.layout.images.length") == 1
                    and _plot(driver, "overlay", "gd.layout.images[0].source").endswith(f"/{k}")
                ),
                what="overlay with image",
            )
            drawn = _plot(
                driver, "overlay", "gd.data.filter(t => t.name !== 'source').map(t => [t.x, t.y])"
            )
            assert len(drawn) == len(boxes)
            for (xs, ys), (x1, y1, x2, y2) in zip(drawn, boxes):
                np.testing.assert_allclose(
                    [min(xs), min(ys), max(xs), max(ys)], [x1, y1, x2, y2], atol=1e-3
                )
            image = _plot(
                driver,
                "overlay",
                "[gd.layout.images[0].sizex, gd.layout.images[0].sizey,"
                " gd.layout.xaxis.range, gd.layout.yaxis.range]",
            )
            assert image[:2] == [width, height]
            assert image[2] == [0, width] and image[3] == [height, 0]
            assert any(len(lab.split()) > 1 for lab in info["regions"])  # class names shown
            _shot(driver, "attention-view", f"coco_{k}", tmp_path)
    finally:
        server.shutdown()
