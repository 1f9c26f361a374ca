"""`did show`: the HTML page of real drafts and refinements, loaded in a real headless Chromium
(Selenium + chromedriver): a screenshot that is a real picture, the visible text against the
records, untrusted text shown and never run; and the command's one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO, tiny_model
from typer.testing import CliRunner

from did_cli import cli
from did_cli.evaluation.gen_ppl import sample_tokens
from did_cli.io.record_writer import RecordWriter
from did_cli.pipeline.page import render_page
from did_cli.pipeline.page_html import Pieces, palette
from did_cli.sampling import DraftConfig, RefineConfig, draft, refine
from did_cli.util import unigram_entropy

L = 32
SCRIPT = '<script>document.title="pwned"</script>'
EVIL_ID = "<b id=injected>x</b><script>document.title='pwned'</script>"
WINDOW = (1200, 1600)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# the real subcommands behind the real error guard, in-process (a subprocess costs seconds)
APP = cli.build_app()


def _cli(args):
    return CliRunner().invoke(APP, args)


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def made(tmp_path_factory, tok):
    """Drafts (two prompts, one of them a script; a suffix with characters that GPT-2 splits
    over several byte tokens) and their two-stage refinement, as JSONL files."""
    d = tmp_path_factory.mktemp("show")
    model = tiny_model(length=L, seed=2, std=0.08)
    cfg = DraftConfig(
        n=2, length=L, block_size=4, batch_size=4, top_p=1.0, prompts=[SCRIPT, "Hello"], suffix=" 中文 end"
    )
    drafts = list(draft(model, cfg, tokenizer=tok, progress=False))
    drafts[1]["id"] = EVIL_ID  # an untrusted id; refine keeps it, so the pair still matches
    refined = list(
        refine(
            model,
            [dict(r) for r in drafts],
            RefineConfig(stages=[(8, 0.3), (None, 0.25)], top_p=1.0),
            tokenizer=tok,
            progress=False,
        )
    )
    for name, recs in (("draft.jsonl", drafts), ("refined.jsonl", refined)):
        with RecordWriter(d / name) as w:
            for r in recs:
                w.write(r)
    return d, drafts, refined


@pytest.fixture(scope="module")
def scores(made, tmp_path_factory, tok):
    """The JSON of a real `did eval-ppl --json` run (a random 1-layer GPT-2 as the scorer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d, _, _ = made
    sc = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    ).save_pretrained(sc)
    tok.hf.save_pretrained(sc)
    out = d / "eval.json"
    r = _cli(
        [
            "eval-ppl",
            str(d / "draft.jsonl"),
            str(d / "refined.jsonl"),
            "--scorer",
            str(sc),
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert r.exit_code == 0, r.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def page(made, scores):
    """view.html from the real command line in a subprocess, 3 of the 4 samples shown."""
    d, _, _ = made
    out = d / "view.html"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "did_cli.cli",
            "show",
            str(d / "draft.jsonl"),
            str(d / "refined.jsonl"),
            "--scores",
            str(d / "eval.json"),
            "--limit",
            "3",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by chromedriver; CI must have it, elsewhere the tests skip."""
    exe, drv = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        exe = None
    if not (exe and drv):
        why = "chromium, chromedriver and selenium are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI run without a browser: {why}")
        pytest.skip(why)
    profile = tempfile.mkdtemp(prefix="did-show-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in FLAGS + [f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}"]:
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=Service(drv))
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _colours(png: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return img.size, {c for _, c in img.getcolors(maxcolors=1 << 24)}


def _near(colours: set, hexcode: str, tol: int = 2) -> bool:
    want = tuple(int(hexcode[i : i + 2], 16) for i in (1, 3, 5))
    return any(all(abs(a - b) <= tol for a, b in zip(c, want)) for c in colours)


def test_page_in_chromium(browser, page, made, scores, tok):
    _, drafts, refined = made
    browser.get(page.as_uri())
    assert browser.title == "did show: 4 samples"  # the injected scripts never ran

    # a real picture of the viewport: the shading steps of the legend, the re-mask and change marks
    (w, h), colours = _colours(browser.get_screenshot_as_png())
    vw, vh, dpr = browser.execute_script(
        "return [window.innerWidth, window.innerHeight, window.devicePixelRatio]"
    )
    assert (w, h) == (round(vw * dpr), round(vh * dpr)) and w >= 800 and h >= 800
    assert len(colours) > 50
    assert _near(colours, palette()[-1][0]) and _near(colours, palette()[4][0])
    assert _near(colours, "#d7301f") and _near(colours, "#f28e2b")

    text = browser.execute_script("return document.body.innerText")
    assert "4 samples; the first 3 are shown, 1 left out (--limit)" in text
    assert "Legend" in text and "snapshot confidence" in text
    evals = {name: {s["id"]: s["ppl"] for s in res["samples"]} for name, res in scores["inputs"].items()}
    ppl_d, ppl_r = evals[str(page.parent / "draft.jsonl")], evals[str(page.parent / "refined.jsonl")]
    for k, (d, r) in enumerate(zip(drafts[:3], refined[:3])):
        sec = browser.execute_script(f"return document.getElementById('s{k}').innerText")
        cols = browser.execute_script(
            f"return [...document.querySelectorAll('#s{k} .tokens')].map(e => e.innerText)"
        )
        assert sec.splitlines()[0] == d["id"]
        assert [_norm(c) for c in cols] == [_norm(d["text"]), _norm(r["text"])]
        ent = [unigram_entropy(sample_tokens(x)) for x in (d, r)]
        assert f"entropy {ent[0]:.3f} \u2192 {ent[1]:.3f} nats" in sec
        assert f"gen PPL {ppl_d[d['id']]:.2f} \u2192 {ppl_r[r['id']]:.2f}" in sec
        remasked = {p for st in r["stages"] for p in st["remasked"]}
        changed = sum(a != b for a, b in zip(d["tokens"], r["tokens"]))
        assert remasked and changed
        assert f"re-masked {len(remasked)}" in sec and f"changed {changed}" in sec
        for st in r["stages"]:
            assert f"\t{len(st['remasked'])}\t{st['changed']}\t{st['nfe']}\t" in sec  # the stage table row
    assert drafts[3]["id"] not in text  # left out by --limit 3

    # untrusted text is shown as text: the prompt's script and the id's markup
    assert text.count(SCRIPT) >= 4 and EVIL_ID in text
    assert browser.find_elements("tag name", "script") == []
    assert browser.find_elements("id", "injected") == []
    assert browser.execute_script("return document.querySelectorAll('.x').length") > 0


def test_page_loads_nothing(page):
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|\bhref=|url\(|@import", html, re.I)
    assert "default-src 'none'" in html  # and a policy that would block any load or script


def test_refined_file_alone_shows_its_draft(made, tok):
    _, drafts, refined = made
    html = render_page(refined, tokenizer=tok, limit=0)
    assert html.count("<h3>draft</h3>") == 4 and html.count("<h3>refined</h3>") == 4
    assert "no confidence in the record" in html  # the draft column: refined records keep no draft confidence
    d_ent = unigram_entropy(sample_tokens(drafts[0]))
    assert f"entropy {d_ent:.3f}" in html
    one = render_page(drafts[:1], tokenizer=tok)
    assert "<h3>draft</h3>" in one and "<h3>refined</h3>" not in one and "re-masked" not in one


def test_scores_are_matched_without_file_names(made, scores, tok):
    """Eval inputs named after other files still land on their side (by entropy, else by order);
    one whose ids match no sample is reported; a record's own gen_ppl is used without scores."""
    _, drafts, refined = made
    (dname, dres), (rname, rres) = scores["inputs"].items()
    renamed = {
        "inputs": {
            "elsewhere/a.jsonl": dres,
            "elsewhere/b.jsonl": rres,
            "c.jsonl": {"samples": [{"id": "nobody", "ppl": 1.0, "entropy": 1.0}]},
        }
    }
    html = render_page(drafts, refined, scores=renamed, tokenizer=tok)
    for d, r in zip(dres["samples"], rres["samples"]):
        assert f"gen PPL {d['ppl']:.2f} \u2192 {r['ppl']:.2f}" in html
    assert "scores of c.jsonl match neither shown file" in html
    own = [dict(drafts[0], gen_ppl=12.345)]
    assert "gen PPL 12.35" in render_page(own, tokenizer=tok) and "mean gen PPL" in render_page(
        own, tokenizer=tok
    )


def test_spans_concatenate_to_the_decoded_text(tok):
    text = "héllo 中文 😀 x\n\ttab <b>&amp;</b>"
    ids = tok.encode(text)
    spans = Pieces(tok).spans(ids)
    assert "".join(s for _, _, s in spans) == text
    assert [a for a, _, _ in spans] == sorted({a for a, _, _ in spans}) and spans[-1][1] == len(ids)
    assert any(b - a > 1 for a, b, _ in spans)  # the split CJK character and the emoji are grouped
    assert "\ufffd" not in "".join(s for _, _, s in spans)


def _one_line_error(r, code):
    assert r.exit_code == code, (r.exit_code, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("did: error:") and "Traceback" not in r.stderr, r.stderr
    return err[0]


def test_bad_inputs_give_one_line_errors(made, tmp_path):
    d, _, _ = made
    good = str(d / "draft.jsonl")
    assert (
        "no such file"
        in _one_line_error(
            _cli(["show", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "v.html")]), 1
        ).lower()
    )
    msg = _one_line_error(_cli(["show", good, "-o", str(tmp_path / "nodir" / "v.html")]), 1)
    assert "does not exist" in msg
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"schema": "other/2", "id": "0", "tokens": [1]}) + "\n")
    assert "unsupported schema" in _one_line_error(
        _cli(["show", str(other), "-o", str(tmp_path / "v.html")]), 1
    )
    assert "at most two" in _one_line_error(
        _cli(["show", good, good, good, "-o", str(tmp_path / "v.html")]), 2
    )
    bad_scores = tmp_path / "s.json"
    bad_scores.write_text("[1, 2]")
    assert "eval-ppl" in _one_line_error(
        _cli(["show", good, "--scores", str(bad_scores), "-o", str(tmp_path / "v.html")]), 1
    )
    assert not (tmp_path / "v.html").exists() and sorted(tmp_path.iterdir()) == sorted([other, bad_scores])


def test_output_to_stdout_and_through_a_non_regular_file(made, tmp_path):
    d, _, _ = made
    r = _cli(["show", str(d / "draft.jsonl"), "--limit", "1", "-o", "-"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("<!DOCTYPE html>") and r.stdout.rstrip().endswith("</html>")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = _cli(["show", str(d / "draft.jsonl"), "--limit", "1", "-o", str(fifo)])
    got = reader.communicate(timeout=30)[0].decode()
    assert r.exit_code == 0, r.stderr
    assert got.startswith("<!DOCTYPE html>") and fifo.exists() and not fifo.is_file()


@pytest.mark.slow
def test_quickstart_page_in_chromium(browser, tmp_path):
    """`did quickstart` at its smallest writes view.html and links it from report.md; Chromium
    renders it (a screenshot kept beside it) with every shown record's text visible."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from did_cli.io.records import read_records
    from did_cli.io.tokenizer import load_tokenizer
    from did_cli.pipeline.end_to_end import QuickstartConfig, run

    sc = tmp_path / "scorer"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    ).save_pretrained(sc)
    load_tokenizer("gpt2").hf.save_pretrained(sc)
    out = tmp_path / "qs"
    run(
        QuickstartConfig(
            out=str(out), minutes=1, samples=3, seq_len=32, preset="tiny", scorer=str(sc), device="cpu"
        )
    )
    assert "[view.html](view.html)" in (out / "report.md").read_text()
    browser.get((out / "view.html").as_uri())
    png = browser.get_screenshot_as_png()
    (out / "view.png").write_bytes(png)
    (w, h), colours = _colours(png)
    assert w >= 800 and h >= 800 and len(colours) > 50
    text = browser.execute_script("return document.body.innerText")
    drafts, refined = (list(read_records(str(out / f))) for f in ("draft.jsonl", "refined.jsonl"))
    assert len(drafts) == len(refined) == 3
    for k, (d, r) in enumerate(zip(drafts, refined)):
        cols = browser.execute_script(
            f"return [...document.querySelectorAll('#s{k} .tokens')].map(e => e.innerText)"
        )
        assert [_norm(c) for c in cols] == [_norm(d["text"]), _norm(r["text"])]
        assert d["id"] in text
