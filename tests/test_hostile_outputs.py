"""Nothing runs that the user did not ask for and nothing is lost, on the writing side
(docs/reliability.md, "Hostile inputs"): planted temporaries and recovery files, locks that are
not ours, outputs that are inputs, outputs told by what they are, prepare's rebuilds and a
killed run's leftovers, one training process per run folder. Every failing case asserts the
exit code, exactly one `did: error:` line, no traceback, no leftovers and what must survive."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import tiny_model
from test_train import corpus_slice
from typer.testing import CliRunner

from did_cli import cli
from did_cli.io.data import PreparedData
from did_cli.io.model_folder import save_model
from did_cli.io.packing import prepare

L = 32
FAST = ["--sampler", "parallel", "--tokens-per-step", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
APP = cli.build_app()


def did(*args, input=None):
    return CliRunner().invoke(APP, [str(a) for a in args], input=input)


def did_proc(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "did_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=kw.pop("env", ENV),
        timeout=kw.pop("timeout", 600),
        **kw,
    )


def one_line_error(r, code: int = 1) -> str:
    rc = getattr(r, "exit_code", getattr(r, "returncode", None))
    assert rc == code, (rc, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("did: error: "), lines[0]
    return lines[0]


def no_leftovers(folder: Path) -> None:
    left = [p.name for p in Path(folder).rglob("*") if p.name.endswith((".partial", ".tmp", ".lock"))]
    left += [p.name for p in Path(folder).rglob(".did-prepare-*")]
    assert not left, left


def interruptible() -> None:
    """In a child about to get SIGINT: the default disposition, even when the tests themselves
    run as a background job (which ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def holder(code: str) -> subprocess.Popen:
    """A process that takes a lock with did's own code, says 'held' on stdout, then waits."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport time\ntime.sleep(600)\n"
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-out")


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    save_model(tiny_model(length=L, seed=3, std=0.08), root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def src(root) -> Path:
    return corpus_slice(root / "slice.jsonl", every=200)


@pytest.fixture(scope="module")
def data(root, src) -> Path:
    prepare([str(src)], root / "data", seq_len=L, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def drafts(root, ckpt) -> Path:
    out = root / "drafts.jsonl"
    assert did("draft", "--model", ckpt, "-n", 2, *FAST, "-o", out).exit_code == 0
    return out


# -------------------------------------------------------------------- 2. planted temporaries


def test_a_planted_recovery_link_is_never_followed_nor_overwritten(ckpt, root):
    folder = root / "planted"
    folder.mkdir()
    (folder / "victim").write_text("precious\n")
    (folder / "out.jsonl.partial").symlink_to(folder / "victim")
    r = did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", folder / "out.jsonl")
    assert r.exit_code == 0, r.stderr
    assert (folder / "victim").read_text() == "precious\n"
    assert not (folder / "out.jsonl").is_symlink()
    assert [json.loads(x)["id"] for x in (folder / "out.jsonl").read_text().splitlines()] == ["draft-0-0"]
    assert (folder / "out.jsonl.partial").is_symlink()  # someone else's: left as it was


def test_an_earlier_recovery_file_is_kept_and_the_new_one_is_named(ckpt, root):
    folder = root / "recovery"
    folder.mkdir()
    earlier = folder / "out.jsonl.partial"
    earlier.write_text('{"an": "earlier run\'s record"}\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "did_cli", "draft", "--model", str(ckpt), "-n", "40", "--batch-size", "1"]
        + FAST
        + ["-o", str(folder / "out.jsonl")],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=interruptible,
    )
    for line in proc.stderr:  # the first record is written before its line is printed
        if line.startswith("draft-0-0:"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=600) == 130, rest
    new = folder / "out.jsonl.2.partial"
    assert "finished records kept in " in rest and rest.count("out.jsonl.2.partial") == 1, rest
    assert "did: interrupted" in rest, rest
    assert earlier.read_text() == '{"an": "earlier run\'s record"}\n'
    assert json.loads(new.read_text().splitlines()[0])["id"] == "draft-0-0"
    assert not (folder / "out.jsonl").exists() and not (folder / "out.jsonl.lock").exists()


def test_a_lock_file_that_is_not_ours_is_refused_not_deleted(ckpt, drafts, root):
    folder = root / "foreign-locks"
    folder.mkdir()
    mine = folder / "out.jsonl.lock"
    mine.write_text("my notes about out.jsonl\n")
    msg = one_line_error(did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", folder / "out.jsonl"))
    assert f"cannot write {folder / 'out.jsonl'}: {mine} exists and is not a did lock" in msg, msg
    assert mine.read_text() == "my notes about out.jsonl\n"
    # a link at the lock's name is not followed either
    (folder / "target").write_text("keep\n")
    (folder / "r.jsonl.lock").symlink_to(folder / "target")
    msg = one_line_error(did("refine", drafts, "--model", ckpt, "-o", folder / "r.jsonl"))
    assert "r.jsonl.lock exists and is not a did lock" in msg, msg
    assert (folder / "r.jsonl.lock").is_symlink() and (folder / "target").read_text() == "keep\n"
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl.lock", "r.jsonl.lock", "target"]


def test_a_live_lock_is_recognised_by_its_holder_not_by_a_pid(ckpt, drafts, root):
    out = root / "held.jsonl"
    out.write_text("earlier\n")
    p = holder(
        "from did_cli.io.outputs import output_lock, target\n"
        f"lock = output_lock(target({str(out)!r}), 'did refine')"
    )
    try:
        msg = one_line_error(did("refine", drafts, "--model", ckpt, "-o", out))
        assert f"another did process (pid {p.pid}, did refine) is writing it" in msg, msg
        assert out.read_text() == "earlier\n"
    finally:
        p.kill()  # SIGKILL: the lock file stays, its flock goes with the process
        p.wait()
    assert Path(str(out) + ".lock").exists()
    r = did("refine", drafts, "--model", ckpt, "-o", out)  # stale: taken over
    assert r.exit_code == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2 and not Path(str(out) + ".lock").exists()


@pytest.mark.parametrize(
    "case",
    [
        "show",
        "show-second-input",
        "show-scores",
        "refine",
        "refine-through-a-link",
        "eval-ppl",
        "draft-prompts",
    ],
)
def test_an_output_that_is_an_input_is_refused(case, ckpt, drafts, root):
    folder = root / f"same-{case}"
    folder.mkdir()
    d = folder / "d.jsonl"
    d.write_bytes(drafts.read_bytes())
    prompts = folder / "p.jsonl"
    prompts.write_text('{"id": "q", "prompt": "Once upon a time"}\n')
    (folder / "link.jsonl").symlink_to(d)
    scores = folder / "s.json"
    scores.write_text('{"inputs": {}}')
    args = {
        "show": ["show", d, "-o", d],
        "show-second-input": ["show", drafts, d, "-o", d],
        "show-scores": ["show", d, "--scores", scores, "-o", scores],
        "refine": ["refine", d, "--model", ckpt, "-o", d],
        "refine-through-a-link": ["refine", d, "--model", ckpt, "-o", folder / "link.jsonl"],
        "eval-ppl": ["eval-ppl", d, "--json", d],
        "draft-prompts": ["draft", "--model", ckpt, "--prompts", prompts, "-o", prompts],
    }[case]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()}
    msg = one_line_error(did(*args), code=2)
    assert "is also the input" in msg and "choose another output" in msg, msg
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_symlink()} == before
    no_leftovers(folder)


# ---------------------------------------------------------------- 3. outputs told by stat


def test_a_regular_file_under_dev_is_a_file_replaced_whole(ckpt):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm here")
    folder = shm / f"did-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        out = folder / "o.jsonl"
        for _ in range(2):
            r = did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", out)
            assert r.exit_code == 0, r.stderr
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["draft-0-0"]  # replaced
        assert sorted(p.name for p in folder.iterdir()) == ["o.jsonl"]  # no lock, no .partial left
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# ------------------------------------------------------------------ 4. rebuilds that destroy


def _limited(max_bytes: int):
    def setup():  # a file-size limit: writes past it fail with EFBIG, like a disk that fills
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return setup


def test_a_rebuild_that_fails_keeps_the_good_data(root, src):
    out = root / "rebuild"
    mine = root / "rebuild-src.jsonl"
    mine.write_bytes(src.read_bytes())
    assert did("prepare", mine, "--out", out, "--seq-len", L).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(mine, "a") as f:  # the same source, changed bytes: a rebuild of this preparation
        f.write(json.dumps({"text": "one more document " * 50}) + "\n")
    r = did_proc("prepare", mine, "--out", out, "--seq-len", L, preexec_fn=_limited(4096))
    assert one_line_error(r) == f"did: error: cannot write {out / 'train.bin'}: File too large"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # meta.json and rows intact
    assert PreparedData(out).rows("train").shape[1] == L
    no_leftovers(out)
    r = did("prepare", mine, "--out", out, "--seq-len", L)  # the same command, room again: rebuilt
    assert r.exit_code == 0, r.stderr
    assert (out / "train.bin").read_bytes() != before["train.bin"]
    no_leftovers(out)


def test_what_a_killed_prepare_left_is_cleaned_by_the_same_command(root, src):
    out = root / "killed"
    assert did("prepare", src, "--out", out, "--seq-len", L).exit_code == 0
    good = (out / "train.bin").read_bytes()
    # what a prepare killed with SIGKILL leaves: its lock (its process gone), a staging folder,
    # a temporary of the atomic writer, and a train.bin whose meta.json was already gone
    (out / "meta.json").unlink()
    (out / ".did-prepare-k1ll3d").mkdir()
    (out / ".did-prepare-k1ll3d" / "train.bin").write_bytes(good[:100])
    (out / ".validation.bin.x7q2m9.tmp").write_bytes(b"\0" * 10)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".did.lock").write_text(f"did-lock/1 pid={dead.pid} host={os.uname().nodename} what=did prepare\n")
    r = did("prepare", src, "--out", out, "--seq-len", L)
    assert r.exit_code == 0, r.stderr
    assert "removed what an interrupted `did prepare` left" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "validation.bin"]
    assert (out / "train.bin").read_bytes() == good
    # a train.bin with no trace of our writer beside it is the user's: refused, as before
    (out / "meta.json").unlink()
    msg = one_line_error(did("prepare", src, "--out", out, "--seq-len", L))
    assert "files that are not this preparation" in msg and (out / "train.bin").read_bytes() == good


def test_a_second_prepare_of_the_same_folder_is_refused(root, src):
    out = root / "busy-prep"
    out.mkdir()
    p = holder(
        "from pathlib import Path\nfrom did_cli.io import prepared_folder\n"
        f"ctx = prepared_folder.hold(Path({str(out)!r}))\nctx.__enter__()"
    )
    try:
        msg = one_line_error(did("prepare", src, "--out", out, "--seq-len", L))
        assert f"is being written by another did process (pid {p.pid}, did prepare)" in msg, msg
    finally:
        p.kill()
        p.wait()
    assert did("prepare", src, "--out", out, "--seq-len", L).exit_code == 0  # stale lock taken over
    no_leftovers(out)


# -------------------------------------------------------------------- 5. run-folder locks


@pytest.fixture(scope="module")
def wide_val(root, src) -> Path:
    """Prepared rows with half the documents held out: enough validation batches for --clip auto."""
    prepare([str(src)], root / "wide-val", seq_len=L, val_fraction=0.5, progress=False)
    return root / "wide-val"


def test_one_process_trains_a_run_folder_and_a_failed_start_leaves_nothing(wide_val, root):
    """A real `did train` holds the folder (its first evaluation runs --clip auto, which reports
    its progress with an estimate); a second train and a --resume of the same folder are
    refused naming it; Ctrl-C before the first checkpoint leaves no trace of the run."""
    run = root / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "did_cli",
            "train",
            "--data",
            str(wide_val),
            "--out",
            str(run),
            "--preset",
            "tiny",
        ]
        + ["--steps", "2", "--batch-size", "2", "--clip", "auto", "--clip-batches", "40", "--warmup", "1"],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=interruptible,
    )
    seen = []
    for line in first.stderr:  # config.json is written and the lock held before the first evaluation
        seen.append(line)
        if "clip search (block" in line:
            break
    assert "about" in seen[-1] and "left" in seen[-1] and "candidate 1/" in seen[-1], seen
    try:
        assert (run / "config.json").is_file()
        for extra in ([], ["--resume"]):
            msg = one_line_error(did("train", "--data", wide_val, "--out", run, "--steps", 1, "-q", *extra))
            assert f"--out {run} is being trained by another did process (pid {first.pid}, did train" in msg
    finally:
        first.send_signal(signal.SIGINT)
        rest = first.stderr.read()
    assert first.wait(timeout=600) == 130, rest
    assert not run.exists(), list(run.iterdir())  # nothing refuses the next `did train --out run`
