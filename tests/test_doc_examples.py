"""Every shell and Python example of README.md and docs/ runs: each page's examples in order, in
a fresh, empty folder of its own, as written except for sizes and steps, which are shrunk by the
substitutions below (`--steps 2000` -> 2, `-n 64` -> 2, `--preset small` -> tiny, ...).

No file is carried over from another page or made for a page by the test: a page makes what it
uses or opens with the one command that makes it. Scripts of the checkout are named from
`$DID_REPO` (the checkout, set here as a reader sets it once), so they work from any folder.
Examples that cannot run here are counted as skipped with the reason (`NOT_HERE`: the hub,
several GPUs, installs, a server; placeholders such as `<samples.jsonl>` for the reader's own
files, which a shell refuses visibly); synopsis lines (`did draft --model CKPT [OPTIONS]`) are
not examples, and a command with a literal `...` fails (a shell would pass it on as text). One
line per page gives its counts, and the session's last lines the totals:
`doc examples: N run, N passed, N skipped`.

Slow: about 20-30 minutes on 2 CPU cores (`pytest -m slow tests/test_doc_examples.py`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL = {"", "bash", "sh", "shell", "console"}
START = re.compile(
    r"^\s*(\$ )?(did |python |python3 |accelerate |torchrun |pip |cat |echo |[A-Z_]+=\S* "
    r"|examples/|tensorboard )"
)
SYNOPSIS = re.compile(r"\[OPTIONS\]|\[SOURCES|\bCKPT\b|(?<![=/\w])(DIR|RUN|FILE|N)\b(?!=)")
# the reader's own file, written so that a shell refuses it (`did eval-ppl <samples.jsonl>`)
PLACEHOLDER = re.compile(r"<[A-Za-z][\w.-]*(/[\w.-]*)*>")
ELLIPSIS = re.compile(r"(?<![.\w])\.\.\.(?![.\w])")

# examples that cannot run on this machine, offline: (pattern, reason)
NOT_HERE = [
    (r"\bpip install\b", "installs packages"),
    (
        r"Skylion007/|kuleshov-group/|runs/did-owt|--data owt/|owt\.yaml|\bdrafts\.jsonl",
        "needs the Hugging Face hub (OpenWebText, public checkpoints) or what the OpenWebText recipe makes",
    ),
    (r"accelerate launch --config_file", "needs several GPUs"),
    (r"tensorboard --logdir", "starts a server"),
    (r"-m pytest", "the test suite itself"),
    (r"bench/|examples/ablation\.py", "a benchmark (minutes to hours)"),
    (
        r"\bGGUF\b|SmolLM2-135M\.gguf|\w+-smol\b",
        "adapts the real SmolLM2-135M, or uses what that makes (a minute or more per step on a CPU)",
    ),
]

STEPS = {"20": "2", "200": "2", "300": "3", "400": "4", "500": "2", "2000": "2", "4000": "3"}


def _steps(m: re.Match) -> str:
    return m.group(1) + STEPS.get(m.group(2), "2")


def _one_eval_batch(m: re.Match) -> str:
    """Validation on one batch: a size like the others (not where a resume or a config file
    holds the run's own settings)."""
    cmd = m.group(0)
    if re.search(r"--eval-batches|--resume|--config", cmd):
        return cmd
    return cmd.rstrip() + " --eval-batches 1" + (" " if cmd != cmd.rstrip() else "")


def shrink(code: str, scorer: str) -> str:
    """Sizes and steps of an example, shrunk; everything else as written."""
    subs = [
        (r"(--steps[ =]|^steps: |steps=)(\d+)", _steps),
        (r"(?<![\w-])(-n|--n|--samples) \d+", r"\1 2"),
        (r"\b(SAMPLES)=\d+", r"\1=2"),
        (r"\bMINUTES=\d+", "MINUTES=0.5 PRESET=tiny SEQ_LEN=32"),
        (r"--minutes \S+", "--minutes 0.5"),
        (r"--batch-size \d+", "--batch-size 2"),
        (r"--preset (quick|small|medium)", "--preset tiny"),
        (r"--seq-len 1024", "--seq-len 128"),
        (r"\b1024:", "128:"),
        (r",1024\b", ",128"),
        (r"--device cuda", "--device cpu"),
        (r'device="cuda"', 'device="cpu"'),
        (r"--scorer (gpt2-large|models/gpt2-large)", f"--scorer {scorer}"),
        (r'"models/gpt2-large"', repr(scorer)),
        (r"--max-gen-ppl \S+", "--max-gen-ppl 1e9"),
        (r"--num-proc \d+", "--num-proc 1"),
        (r"step-00000500", "step-00000002"),
        (r"--eval-every \d+", "--eval-every 1"),
    ]
    for pat, rep in subs:
        code = re.sub(pat, rep, code, flags=re.M)
    code = re.sub(r"\bdid (train|finetune-mixscale)\b(?:(?!&&|\||;|#).)*", _one_eval_batch, code)
    if "eval-ppl" in code:  # a gate's bars, for a model trained 2 steps
        code = re.sub(r"--min-entropy \S+", "--min-entropy 0", code)
    if re.search(r"(^|\s)did quickstart\b", code):  # the pipeline at its smallest
        code = re.sub(
            r"(did quickstart\b[^\n#]*?)(\s*(#.*)?)$",
            r"\1 --preset tiny --seq-len 32 --samples 2 --minutes 0.5\2",
            code,
            flags=re.M,
        )
    return code


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, code) of the fenced blocks of a page."""
    out, fence = [], None
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, start, buf, indent = m.group(2), m.group(3).lower(), no, [], len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                out.append(
                    (start, lang, "\n".join(ln[indent:] if not ln[:indent].strip() else ln for ln in buf))
                )
                fence = None
            else:
                buf.append(line)
    return out


def commands(code: str) -> list[str]:
    """The commands of a shell block: logical lines (continuations joined, heredocs kept whole)."""
    out, cur, heredoc = [], "", None
    for line in code.splitlines():
        if heredoc is not None:
            cur += "\n" + line
            if line.strip() == heredoc:
                out.append(cur)
                cur, heredoc = "", None
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        m = re.search(r"<<-?\s*'?(\w+)'?", cur)
        if m:
            heredoc = m.group(1)
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip()[2:] if cur.strip().startswith("$ ") else cur.strip())
        cur = ""
    return out


def examples(path: Path) -> list[tuple[int, str, str]]:
    """(line, 'sh' | 'py', code) of a page, in order."""
    found = []
    for no, lang, code in blocks(path):
        if lang == "python":
            found.append((no, "py", code))
        elif lang in SHELL:
            first = next(
                (ln for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")), ""
            )
            if START.match(first):
                found += [
                    (no, "sh", c)
                    for c in commands(code)
                    if START.match(c) and not SYNOPSIS.search(c.split("#")[0])
                ]
    return found


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OUT", "MINUTES", "SAMPLES", "SEQ_LEN", "PRESET", "SCORER")
    }
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="200",
        NO_COLOR="1",
        WANDB_MODE="offline",
        DID_REPO=str(REPO),  # what a reader exports once (getting-started.md): the checkout
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Path:
    """A stand-in for the gen-PPL scorer a page names (a random 1-layer GPT-2 with the bundled
    tokenizer: fast, offline), outside every page's folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from did_cli.io.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=160, vocab_size=50257)
    ).save_pretrained(d)
    load_tokenizer("gpt2").hf.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tally(request):
    """Counts per page; the totals are written when the session ends (whatever ran, in any order)."""
    pages: dict[str, list[str]] = {}
    yield pages
    if not pages:
        return
    total = [s for ss in pages.values() for s in ss]
    run = len(total) - total.count("skipped")
    line = f"doc examples: {run} run, {total.count('passed')} passed, {total.count('skipped')} skipped"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(line)


def _page_id(p: Path) -> str:
    return str(p.relative_to(REPO))


def _status(code: str) -> str | None:
    """Why an example is not run here (None: it runs)."""
    why = next((reason for pat, reason in NOT_HERE if re.search(pat, code)), None)
    if why is None and PLACEHOLDER.search(code):
        why = "names the reader's own file (a placeholder)"
    return why


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=_page_id)
def test_page_examples_run(page, scorer, tally, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()  # empty: nothing from another page, nothing made for this one
    env = _env()
    failed, states = [], tally.setdefault(_page_id(page), [])
    for no, kind, code in examples(page):
        if kind == "sh" and ELLIPSIS.search(code.split("#")[0]):
            states.append("failed")
            failed.append(f"{page.name}:{no}: a literal '...' is no placeholder: {code}")
            continue
        if _status(code) is not None:
            states.append("skipped")
            continue
        run = shrink(code, str(scorer))
        argv = [sys.executable, "-c", run] if kind == "py" else ["bash", "-e", "-o", "pipefail", "-c", run]
        try:
            r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
            rc, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = (
                "timeout",
                (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else "",
            )
        states.append("passed" if rc == 0 else "failed")
        if rc != 0:
            failed.append(f"{page.name}:{no}: {run}\n    exit {rc}: {err.strip()[-800:]}")
    with capsys.disabled():
        print(
            f"\n{_page_id(page)}: {states.count('passed')}/{len(states) - states.count('skipped')} passed, "
            f"{states.count('skipped')} skipped"
        )
    assert not failed, "\n".join(failed)


def test_examples_extractor(tmp_path):
    """What counts as an example, a skip, a placeholder and a literal '...' (fast, no commands run)."""
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\n"
        "did prepare --out data/ --seq-len 128   # makes data/\n"
        "did eval-ppl <samples.jsonl> --json gate.json\n"
        "did draft --model CKPT [OPTIONS]\n"
        "did draft ... | did eval-ppl\n"
        "pip install gguf\n"
        "```\n\n```python\nprint(1)\n```\n"
    )
    found = examples(page)
    assert [k for _, k, _ in found] == ["sh", "sh", "sh", "sh", "py"]  # the synopsis line is not one
    codes = [c for _, _, c in found]
    assert _status(codes[0]) is None and "placeholder" in _status(codes[1])
    assert ELLIPSIS.search(codes[2]) and _status(codes[3]) == "installs packages"
    assert shrink("did train --steps 500 --lr 1e-3 && did draft -n 64", "x") == (
        "did train --steps 2 --lr 1e-3 --eval-batches 1 && did draft -n 2"
    )
    assert (
        shrink("did train --out run/ --resume --steps 300", "x") == "did train --out run/ --resume --steps 3"
    )
