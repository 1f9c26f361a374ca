"""The docs cannot rot: every `did` command in README.md, docs/ and examples/ names a real
subcommand and real options, relative links resolve, and the example scripts run at tiny sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS, REPO / "bench" / "README.md"]
SCRIPTS = sorted((REPO / "examples").glob("*.sh"))
WORKFLOWS = sorted((REPO / "examples").glob("*.yml"))

# a command starts at a line start, after a shell separator or a prompt; `did` as the console
# script, or `-m did_cli.cli` under python / accelerate launch / torchrun
CMD = re.compile(r"(?:(?:^|[|;&({]|\$\(|\$ )\s*did|-m\s+did_cli\.cli)\s+([a-z][a-z0-9-]*)(?=\s|$|\))")
OPT = re.compile(r"(?<![\w$/.-])(--?[a-zA-Z][a-zA-Z0-9-]*)")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text-shell", "yaml", "yml"}
INLINE = re.compile(r"`([^`\n]+)`")


def _env(**extra: str) -> dict[str, str]:
    # the example scripts read their sizes from the environment: start from none of them
    script_vars = {
        "OUT",
        "MODEL",
        "SOURCES",
        "SCORER",
        "MAX_GEN_PPL",
        "MIN_ENTROPY",
        "STEPS",
        "SAMPLES",
        "SEQ_LEN",
        "PRESET",
        "BATCH",
        "LR",
        "WARMUP",
        "BLOCK",
        "RATIO",
        "DEVICE",
        "SEED",
        "MINUTES",
    }
    env = {k: v for k, v in os.environ.items() if k not in script_vars}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


# ------------------------------------------------------------------------ the help texts


def _subcommands() -> list[str]:
    from did_cli.commands.registry import COMMANDS

    return list(COMMANDS)


def _options_from_help(text: str) -> set[str]:
    """Option names of one `did SUB --help` page (rich panels, box drawing stripped)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    opts: set[str] = set()
    for line in text.splitlines():
        line = re.sub(r"[\u2500-\u257f]", " ", line)
        body = line.lstrip()
        indent = len(line) - len(body)
        if indent > 10:  # wrapped description text, not the option column
            continue
        for tok in body.split():
            if tok in ("*",):
                continue
            if not tok.startswith("-"):
                break
            opts.add(tok.rstrip(","))
    return opts


@lru_cache(maxsize=1)
def _all_help() -> dict[str, set[str]]:
    def one(sub: str) -> tuple[str, set[str]]:
        res = subprocess.run(
            [sys.executable, "-m", "did_cli.cli", sub, "--help"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=120,
        )
        assert res.returncode == 0, f"did {sub} --help failed:\n{res.stderr}"
        return sub, _options_from_help(res.stdout)

    with ThreadPoolExecutor(max_workers=4) as ex:
        return dict(ex.map(one, _subcommands()))


def test_help_parser_sees_known_options():
    helps = _all_help()
    assert {"--model", "-n", "--n", "--block-size", "-o", "--output", "--help"} <= helps["draft"]
    assert {"--json", "--max-gen-ppl", "--min-entropy", "--scorer"} <= helps["eval-ppl"]
    assert {"--init", "--draft-block", "--global-weight", "-q"} <= helps["finetune-mixscale"]
    # descriptions are not mistaken for options
    assert "--data" not in helps["draft"]


# ------------------------------------------------------------------------ commands in the docs


def _logical_lines(block: str) -> list[str]:
    """Join backslash continuations; drop comments."""
    out, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return [re.sub(r"(^|\s)#.*$", "", ln) for ln in out]


def _snippets(path: Path) -> list[tuple[int, str]]:
    """(line number, command text) for shell code blocks and inline code of a markdown file, or
    every line of a shell script / workflow."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".sh", ".yml", ".yaml"):
        return list(enumerate(_logical_lines(text), 1))
    out: list[tuple[int, str]] = []
    fence, lang, start, buf = None, "", 0, []
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, start, buf = m.group(2), m.group(3).lower(), no, []
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                if lang in SHELL_LANGS:
                    out += [(start, ln) for ln in _logical_lines("\n".join(buf))]
                fence = None
            else:
                buf.append(line)
            continue
        out += [(no, code) for code in INLINE.findall(line)]
    return out


def _invocations(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, subcommand, options) of every `did SUB ...` in a file."""
    found = []
    for no, text in _snippets(path):
        text = text.strip()
        if text.startswith("$ "):
            text = text[2:]
        matches = list(CMD.finditer(text))
        for k, m in enumerate(matches):
            end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
            seg = text[m.end() : end]
            seg = re.split(r"\s(?:\||&&|;|>|<|2>)\s", seg)[0]  # up to the next pipe or redirection
            seg = re.sub(r"'[^']*'|\"[^\"]*\"", " ", seg)  # quoted values are not options
            found.append((no, m.group(1), OPT.findall(seg)))
    return found


def _doc_files() -> list[Path]:
    return [p for p in PAGES + SCRIPTS + WORKFLOWS if p.is_file()]


def test_docs_mention_commands():
    seen = {sub for p in _doc_files() for _, sub, _ in _invocations(p)}
    # every subcommand is shown at least once
    assert set(_subcommands()) <= seen, f"never shown in the docs: {set(_subcommands()) - seen}"


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_exist(path: Path):
    helps = _all_help()
    bad = []
    for no, sub, opts in _invocations(path):
        if sub not in helps:
            bad.append(f"line {no}: `did {sub}`: no such subcommand")
            continue
        for opt in opts:
            if opt not in helps[sub]:
                bad.append(f"line {no}: `did {sub} {opt}`: no such option")
    assert not bad, f"{path.relative_to(REPO)}:\n" + "\n".join(bad)


def test_cli_reference_lists_every_option():
    """docs/cli.md has a section per subcommand naming each of its options."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `did ([a-z-]+)`\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    missing = []
    for sub, opts in _all_help().items():
        if sub not in sections:
            missing.append(f"did {sub}: no section")
            continue
        missing += [f"did {sub} {o}" for o in sorted(opts - {"--help"}) if f"`{o}`" not in sections[sub]]
    assert not missing, "docs/cli.md lacks: " + ", ".join(missing)


def test_extractor_finds_commands_in_all_forms(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "Run `did draft --model run/ -n 4` then:\n\n```bash\n$ did refine --model run/ - \\\n"
        "    --stages L:0.25 | did eval-ppl --json - --max-gen-ppl 40  # gate\n```\n\n"
        "```\naccelerate launch --config_file examples/accelerate/ddp.yaml -m did_cli.cli train --data d/ "
        "--out r/\n```\n\n"
        "```python\ndid_cli.sampling.draft(model, cfg)\n```\n"
    )
    got = [(sub, opts) for _, sub, opts in _invocations(md)]
    assert got == [
        ("draft", ["--model", "-n"]),
        ("refine", ["--model", "--stages"]),
        ("eval-ppl", ["--json", "--max-gen-ppl"]),
        ("train", ["--data", "--out"]),
    ]


# ------------------------------------------------------------------------ links


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [p for p in PAGES if p.is_file()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            bad.append(target)
    assert not bad, f"{path.relative_to(REPO)}: broken links {bad}"


# ------------------------------------------------------------------------ the example scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_header(script: Path):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = script.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    code = [ln for ln in lines[1:] if ln.strip() and not ln.lstrip().startswith("#")]
    assert code[0].strip() == "set -euo pipefail", f"{script.name}: first command must be `set -euo pipefail`"
    assert any(ln.startswith("# Usage:") for ln in lines), f"{script.name}: no usage comment"


def test_ci_workflow_runs_the_gate():
    wf = (REPO / "examples" / "ci-gate.yml").read_text()
    assert "examples/ci_gate.sh" in wf and "MAX_GEN_PPL" in wf and "MIN_ENTROPY" in wf
    try:
        import yaml
    except ImportError:
        return
    doc = yaml.safe_load(wf)
    assert doc["jobs"]


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory) -> Path:
    """A random 1-layer GPT-2 with the bundled tokenizer: fast, offline, deterministic."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from did_cli.io.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("scorer")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    ).save_pretrained(d)
    load_tokenizer("gpt2").hf.save_pretrained(d)
    return d


def _text_slice(folder: Path, docs: int = 30) -> Path:
    """The first documents of the bundled corpus as a small .jsonl source for `did prepare`."""
    import lzma

    from did_cli.io.sources import BUNDLED_CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(docs)]
    (folder / "slice.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder


def _run_script(name: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "examples" / name)],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.slow
def test_ci_gate_passes_and_fails(tmp_path, tiny_scorer):
    """examples/ci_gate.sh end to end: prepare a slice, train 2 steps, draft, refine, score. A
    random scorer gives gen PPL near the vocabulary size (~5e4): a bar above it passes, a bar
    below it must fail the script."""
    out = tmp_path / "gate"
    common = dict(
        OUT=str(out),
        SOURCES=str(_text_slice(tmp_path / "src")),
        SEQ_LEN="16",
        STEPS="2",
        BATCH="4",
        SAMPLES="2",
        DEVICE="cpu",
        SCORER=str(tiny_scorer),
        MIN_ENTROPY="0",
    )
    ok = _run_script("ci_gate.sh", MAX_GEN_PPL="1e9", **common)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is True and set(gate["inputs"]) == {
        str(out / "draft.jsonl"),
        str(out / "refined.jsonl"),
    }
    assert (out / "run" / "best.json").is_file()

    # same model (training is skipped: OUT/run/best.json exists), a bar that cannot be met
    bad = _run_script("ci_gate.sh", MAX_GEN_PPL="10", **common)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "threshold not met" in bad.stderr and "FAILED" in bad.stderr
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is False and gate["reasons"]

    # no thresholds: a usage error, before any work
    res = _run_script("ci_gate.sh", timeout=60, OUT=str(out))
    assert res.returncode != 0 and "MAX_GEN_PPL" in res.stderr


@pytest.mark.slow
def test_quickstart_script_smallest(tmp_path, tiny_scorer):
    """examples/quickstart.sh at the smallest size: report, results.json and the three plots."""
    out = tmp_path / "qs"
    res = _run_script(
        "quickstart.sh",
        OUT=str(out),
        MINUTES="1",
        SAMPLES="4",
        PRESET="tiny",
        SEQ_LEN="32",
        SCORER=str(tiny_scorer),
        DEVICE="cpu",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "refined: gen PPL" in res.stdout
    assert (out / "report.md").is_file()
    r = json.loads((out / "results.json").read_text())
    for key in (
        "draft_mean_gen_ppl",
        "refined_mean_gen_ppl",
        "draft_mean_entropy",
        "refined_mean_entropy",
        "scorer",
    ):
        assert key in r, key
    assert r["scorer"] and r["config"]["samples"] == 4
    # the entropy control: drafts at a lower nucleus, and the verdict read at matched entropy
    assert r["control_draft"]["top_p"] == 0.8 and r["control_draft"]["n"] == 4
    matched = r["draft_mean_gen_ppl_at_refined_entropy"]
    assert isinstance(r["refinement_helps"], bool)
    # a minute of training is no model: no conclusion, and a budget that would give one
    check = r["training_check"]
    assert r["model_trained"] is False and check["trained"] is False and check["steps"] < 250
    assert r["verdict"] == "untrained" and r["refinement_helps"] is False and check["reasons"]
    assert check["suggested_minutes"] is None or check["suggested_minutes"] > 1
    report = (out / "report.md").read_text()
    assert "**No conclusions: the model did not train**" in report and "Refinement beats" not in report
    assert "NO CONCLUSIONS" in res.stderr
    if matched is None:
        assert r["refinement_beats_entropy_control"] is None
    else:
        # the verdicts follow the paired bootstrap interval, not the point estimates
        ci = r["gap_vs_entropy_control_ci"]
        want = None if ci is None else ("beats" if ci["hi"] < 0 else "worse" if ci["lo"] > 0 else "level")
        assert r["refinement_vs_entropy_control"] == want
        assert r["refinement_beats_entropy_control"] == (want == "beats")
    ci = r["relative_change_gen_ppl_ci"]
    assert ci["lo"] <= ci["estimate"] <= ci["hi"] and ci["n"] == 4
    assert r["refinement_vs_draft"] == ("beats" if ci["hi"] < 0 else "worse" if ci["lo"] > 0 else "level")
    for png in ("training_curve.png", "gen_ppl_draft_vs_refined.png", "confidence_remasked_vs_kept.png"):
        assert (out / png).stat().st_size > 0, png
    for f in ("draft.jsonl", "refined.jsonl"):
        assert len((out / f).read_text().splitlines()) == 4
