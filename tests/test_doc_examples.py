"""Every shell and Python example of README.md and docs/ runs: each page's examples in order, in
one fresh folder per page, as written except for sizes and steps, which are shrunk by the
substitutions below (`--steps 2000` -> 2, `-n 64` -> 2, `--preset small` -> tiny, ...).

A page may use files it does not make only where it says where they come from; the test puts
those (`PROVIDED`) in the folder first, made by the real commands. Examples that cannot run
here are counted as skipped with the reason (`NOT_HERE`: the hub, several GPUs, installs, a
server); synopsis lines (`did draft --model CKPT [OPTIONS]`) are not examples. The closing
summary line gives the counts: `doc examples: N run, N passed, N skipped`.

Slow: about 15-25 minutes on 2 CPU cores (`pytest -m slow tests/test_doc_examples.py`).
"""

from __future__ import annotations

import os
import re
import shutil
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
SYNOPSIS = re.compile(r"\[OPTIONS\]|\[SOURCES|\.\.\.|\bCKPT\b|(?<![=/\w])(DIR|RUN|FILE|N)\b(?!=)")

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
    (r"\bGGUF\b|SmolLM2-135M\.gguf", "adapts the real SmolLM2-135M (a minute or more per step on a CPU)"),
]

STEPS = {"20": "2", "200": "2", "300": "3", "400": "4", "500": "2", "2000": "2", "4000": "3"}


def _steps(m: re.Match) -> str:
    return m.group(1) + STEPS.get(m.group(2), "2")


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


# what a page uses without making it, each said on the page to come from elsewhere
PROVIDED = {
    "draft.md": ["data", "run", "prompts.jsonl"],
    "eval-ppl.md": ["data", "run", "samples.jsonl"],
    "finetune-mixscale.md": ["data", "run"],
    "formats.md": ["data", "run", "in.jsonl"],
    "multi-gpu.md": ["data"],
    "prepare.md": ["notes", "books.jsonl.gz"],
    "prompting.md": ["run", "prompts.jsonl"],
    "python-api.md": ["run"],
    "refine.md": ["run", "draft.jsonl"],
    "show.md": ["run"],
}


def _env(scorer: str) -> dict:
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
        DID_SCORER=scorer,
        WANDB_MODE="offline",
    )
    env["PATH"] = (
        str(REPO / "examples")
        + os.pathsep
        + str(Path(sys.executable).parent)
        + os.pathsep
        + env.get("PATH", "")
    )
    return env


@pytest.fixture(scope="module")
def provided(tmp_path_factory):
    """The files pages say come from elsewhere, made once by the real commands (tiny, L = 128)."""
    import json
    import lzma

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from did_cli.io.sources import BUNDLED_CORPUS
    from did_cli.io.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("provided")
    scorer = root / "scorer"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=160, vocab_size=50257)
    ).save_pretrained(scorer)
    load_tokenizer("gpt2").hf.save_pretrained(scorer)
    env = _env(str(scorer))
    lines = lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8").read().splitlines()[:200]
    (root / "notes").mkdir()
    for k, ln in enumerate(lines[:20]):
        (root / "notes" / f"{k}.txt").write_text(json.loads(ln)["text"])
    import gzip

    with gzip.open(root / "books.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[20:200]) + "\n")
    (root / "prompts.jsonl").write_text(
        '{"id": "river", "prompt": "The river"}\n{"id": "q2", "prompt": "Once upon a time"}\n'
    )
    for cmd in [
        "did prepare --out data/ --seq-len 128",
        "did train --data data/ --out run/ --steps 2 --batch-size 2 --eval-batches 1 --warmup 1 -q",
        "did draft --model run/ -n 2 --block-size 4 -o draft.jsonl",
    ]:
        r = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stderr)
    shutil.copy(root / "draft.jsonl", root / "samples.jsonl")
    shutil.copy(root / "draft.jsonl", root / "in.jsonl")
    return root, scorer


RESULTS: dict[str, list] = {}


def _page_id(p: Path) -> str:
    return str(p.relative_to(REPO))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=_page_id)
def test_page_examples_run(page, provided, tmp_path):
    root, scorer = provided
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")  # the pages run from a checkout: examples/ is there
    for name in PROVIDED.get(page.name, []):
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, work / name)
    env = _env(str(scorer))
    failed, results = [], RESULTS.setdefault(_page_id(page), [])
    for no, kind, code in examples(page):
        why = next((reason for pat, reason in NOT_HERE if re.search(pat, code)), None)
        if why is not None:
            results.append((no, "skipped", why))
            continue
        run = shrink(code, str(scorer))
        argv = [sys.executable, "-c", run] if kind == "py" else ["bash", "-e", "-o", "pipefail", "-c", run]
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        ok = r.returncode == 0
        results.append((no, "passed" if ok else "failed", run))
        if not ok:
            failed.append(f"{page.name}:{no}: {run}\n    exit {r.returncode}: {r.stderr.strip()[-800:]}")
    assert not failed, "\n".join(failed)


@pytest.mark.slow
def test_zz_summary(capsys):
    """The counts (run after the pages): examples run, passed and skipped, per page and in all."""
    if not RESULTS:
        pytest.skip("no page ran")
    rows = [(page, [s for _, s, _ in res]) for page, res in RESULTS.items()]
    total = [s for _, ss in rows for s in ss]
    with capsys.disabled():
        for page, ss in rows:
            print(
                f"{page}: {ss.count('passed')}/{len(ss) - ss.count('skipped')} passed, "
                f"{ss.count('skipped')} skipped"
            )
        run = len(total) - total.count("skipped")
        print(f"doc examples: {run} run, {total.count('passed')} passed, {total.count('skipped')} skipped")
    assert total.count("failed") == 0
