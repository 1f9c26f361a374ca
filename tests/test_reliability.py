"""Reliability (docs/reliability.md): crash safety, clean interruption, numerical faults, bad
inputs, safe loading and determinism, each shown through the real CLI in subprocesses with a
tiny model (L = 32, batch 4) on a slice of the bundled corpus."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_train import corpus_slice

from did_cli.io import checkpoint as ck
from did_cli.io.data import PreparedData
from did_cli.io.model_folder import export_state_dict, load_model, save_model
from did_cli.io.packing import prepare
from did_cli.io.records import make_record
from did_cli.io.tokenizer import load_tokenizer
from did_cli.training.state import RowSchedule

L = 32
# one thread per process: the same float summation order in every run, and less contention
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# 6 steps, checkpoints at 2, 4, 6 (+ the best at the step-3 evaluation), dropout on so that the
# RNG state has to survive a resume too
TRAIN = [
    "--block-sizes",
    "4,L",
    "--block-weights",
    "0.7,0.3",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--warmup",
    "2",
    "--ema",
    "0.9",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--save-every",
    "2",
    "--keep-last",
    "10",
    "--log-every",
    "1",
    "--dropout",
    "0.1",
    "--seed",
    "5",
]
STEPS = 6
FAST_DRAFT = ["--sampler", "parallel", "--tokens-per-step", "4"]  # 8 model calls per sample


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "did_cli.cli", *map(str, args)]


def did(*args, timeout: float = 300, stdout=subprocess.PIPE, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli(*args), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout, env=ENV, **kw
    )


def interruptible() -> None:
    """A child about to get SIGINT takes the default disposition: under a background job (pytest
    started with `&` from a script) SIGINT is ignored and children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, no traceback)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("did: error: "), lines[0]
    return lines[0]


def metrics(run: Path) -> list[dict]:
    """Every logged event without the wall-clock fields."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        out.append({k: v for k, v in e.items() if k not in ("time", "tokens_per_s")})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    for rel in ("model.safetensors", "train_state/raw_model.safetensors"):
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys(), rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (rel, k)


def clone_run(src: Path, dst: Path, steps: list[int]) -> Path:
    """A copy of a run folder holding only the checkpoints of `steps`."""
    (dst / ck.CKPT_DIR).mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "best.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    for s in steps:
        shutil.copytree(src / ck.CKPT_DIR / ck.checkpoint_name(s), dst / ck.CKPT_DIR / ck.checkpoint_name(s))
    return dst


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rel")


@pytest.fixture(scope="module")
def data_dir(root) -> Path:
    prepare([str(corpus_slice(root / "slice.jsonl", every=100))], root / "data", seq_len=L, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def ref_run(root, data_dir) -> Path:
    """The uninterrupted run every crash / resume test must reproduce exactly."""
    run = root / "ref"
    r = did("train", "--data", data_dir, "--out", run, "--steps", STEPS, "-q", *TRAIN)
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    """A tiny L = 32 checkpoint folder for draft / refine / --init."""
    save_model(tiny_model(length=L, seed=3, std=0.08), root / "ckpt")
    return root / "ckpt"


def resume(data_dir: Path, run: Path) -> subprocess.CompletedProcess:
    return did("train", "--data", data_dir, "--out", run, "--steps", STEPS, "--resume", "-q", *TRAIN)


# -------------------------------------------------------------------------------- crash safety


def _steps_read(log: Path) -> int:
    """The last step whose rows a run has read (its DID_DEBUG_ROWS dump), 0 before any."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def wait_until(condition, timeout: float) -> None:
    """Poll `condition` (no fixed sleep decides anything: only the condition does)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(ref_run, data_dir, root):
    run = root / "killed"
    rows_log = root / "killed-rows"
    proc = subprocess.Popen(
        cli("train", "--data", data_dir, "--out", run, "--steps", STEPS, "-q", *TRAIN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**ENV, "DID_DEBUG_ROWS": str(rows_log)},
    )
    # a seeded moment in steps 3-5 (after the first checkpoint, maybe in the middle of a save):
    # the run is frozen there with SIGSTOP as soon as it has read that step's rows, so it is
    # still running when it is killed however loaded the machine is
    target = random.Random(2024).choice([3, 4, 5])
    log = Path(f"{rows_log}.rank0")
    wait_until(lambda: proc.poll() is not None or _steps_read(log) >= target, timeout=300)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # what a kill in the middle of a checkpoint write leaves behind
    stale = run / ck.CKPT_DIR / ".tmp-step-00000099"
    stale.mkdir(exist_ok=True)
    (stale / "model.safetensors").write_bytes(b"half")

    r = resume(data_dir, run)
    assert r.returncode == 0, r.stderr
    assert not list((run / ck.CKPT_DIR).glob(".tmp-*")) and not list((run / ck.CKPT_DIR).glob(".old-*"))
    assert_same_weights(ref_run / "checkpoints/step-00000006", run / "checkpoints/step-00000006")
    assert metrics(run) == metrics(ref_run)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(damage, ref_run, data_dir, tmp_path):
    run = clone_run(ref_run, tmp_path / "run", [4, 6])
    weights = run / "checkpoints/step-00000006/model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
        reason = "model.safetensors has"
    else:
        raw[len(raw) // 2] ^= 0x01  # same size: only the sha256 in the manifest can tell
        reason = "model.safetensors does not match its sha256"
    weights.write_bytes(bytes(raw))

    r = resume(data_dir, run)
    assert r.returncode == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if "skipping damaged checkpoint" in ln]
    assert len(warning) == 1 and "step-00000006" in warning[0] and reason in warning[0], r.stderr
    assert_same_weights(ref_run / "checkpoints/step-00000006", run / "checkpoints/step-00000006")
    assert metrics(run) == metrics(ref_run)
    assert ck.verify_checkpoint(run / "checkpoints/step-00000006") is None


# ------------------------------------------------------------------------- clean interruption


def test_sigint_during_training_saves_exits_130_and_resumes_exactly(ref_run, data_dir, root):
    run = root / "sigint"
    proc = subprocess.Popen(
        cli("train", "--data", data_dir, "--out", run, "--steps", STEPS, *TRAIN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=interruptible,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"step 3/{STEPS}" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    assert "Traceback" not in rest and "did: interrupted at step" in rest
    saved = ck.latest_checkpoint(run)
    step = ck.step_of(saved)
    assert 3 <= step <= STEPS and f"saved {saved}" in rest
    r = resume(data_dir, run)
    assert r.returncode == 0, r.stderr
    assert_same_weights(ref_run / "checkpoints/step-00000006", run / "checkpoints/step-00000006")
    assert metrics(run) == metrics(ref_run)


def _interrupt_after(proc: subprocess.Popen, n_done: int) -> list[str]:
    """Read stderr until `n_done` records are reported finished, send SIGINT, return the ids
    reported finished (each report is printed after its record was written)."""
    done = []
    for line in proc.stderr:
        if ": " in line and ("tokens," in line or "NFEs" in line):
            done.append(line.split(":", 1)[0])
            if len(done) == n_done:
                break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Traceback" not in rest and "did: interrupted" in rest, rest
    done += [ln.split(":", 1)[0] for ln in rest.splitlines() if "NFEs" in ln]
    return done


def _whole_records(text: str) -> list[str]:
    assert text == "" or text.endswith("\n"), "a partial last line"
    return [json.loads(ln)["id"] for ln in text.splitlines()]


@pytest.fixture(scope="module")
def drafts_file(root, ckpt) -> Path:
    """Hand-made drafts (random tokens and confidences): refine only needs valid records."""
    tok = load_tokenizer("gpt2")
    g = np.random.default_rng(0)
    path = root / "drafts.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            toks = [tok.bos_id] + g.integers(0, 50000, L - 1).tolist()
            rec = make_record(toks, [None] + g.random(L - 1).tolist(), id=f"d{i}", tokenizer=tok)
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.mark.parametrize("cmd", ["draft", "refine"])
@pytest.mark.parametrize("dest", ["stdout", "file"])
def test_sigint_during_sampling_leaves_only_whole_flushed_records(cmd, dest, ckpt, drafts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    args = (
        ["draft", "--model", ckpt, "-n", "40", *FAST_DRAFT]
        if cmd == "draft"
        else ["refine", drafts_file, "--model", ckpt, "--sampler", "parallel", "--tokens-per-step", "4"]
    )
    args += ["--batch-size", "1"] + (["-o", out] if dest == "file" else [])
    with open(tmp_path / "stdout", "wb") as so:
        proc = subprocess.Popen(
            cli(*args), stdout=so, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=interruptible
        )
        done = _interrupt_after(proc, 3)
    if dest == "file":
        # the final name appears only on success; .partial holds what was finished
        assert not out.exists()
        written = _whole_records((tmp_path / "out.jsonl.partial").read_text())
    else:
        written = _whole_records((tmp_path / "stdout").read_text())
    assert len(done) >= 3 and set(done) <= set(written), (done, written)
    assert len(written) < 40  # it really was interrupted


# --------------------------------------------------------------------------- numerical faults


@pytest.fixture(scope="module")
def nan_init(root, data_dir) -> tuple[Path, int]:
    """An --init checkpoint whose embedding row of one token T is NaN, T chosen so that it first
    appears in the rows of step 3 (the row schedule is a pure function of the seed), early in a
    row so that later blocks attend to it, and never in the validation rows."""
    data = PreparedData(data_dir)
    rows = data.rows("train")
    sched = RowSchedule(len(rows), 4, 1, 1, seed=5)
    early = set(np.unique(rows[np.concatenate([sched.indices(s, 0, 0) for s in (0, 1)])]).tolist())
    early |= set(np.unique(data.rows("validation")).tolist())
    step3 = rows[sched.indices(2, 0, 0)]
    token = next(int(t) for t in step3[:, 1:12].reshape(-1) if int(t) not in early and int(t) < 50256)
    folder = root / "nan_init"
    save_model(tiny_model(length=L, seed=4), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["backbone.vocab_embed.embedding"][token] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, token


NAN_ARGS = [
    "--block-sizes",
    "4",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--warmup",
    "1",
    "--eval-every",
    "0",
    "--eval-batches",
    "2",
    "--save-every",
    "1",
    "--log-every",
    "1",
    "--seed",
    "5",
    "-q",
]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    nan_init, data_dir, tmp_path
):
    folder, _ = nan_init
    run = tmp_path / "run"
    r = did("train", "--init", folder, "--data", data_dir, "--out", run, "--steps", "5", *NAN_ARGS)
    assert r.returncode == 1
    line = one_line_error(r)
    last = run / "checkpoints/step-00000002"
    assert line == f"did: error: non-finite loss at step 3 (block size 4); the last good checkpoint is {last}"
    assert [c.name for c in ck.list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert ck.latest_checkpoint(run) == last and ck.verify_checkpoint(last) is None
    assert [e["step"] for e in metrics(run) if e["event"] == "train"] == [1, 2]


def test_nonfinite_loss_skip_mode_skips_only_the_bad_step(nan_init, data_dir, tmp_path):
    folder, token = nan_init
    run = tmp_path / "run"
    r = did(
        "train",
        "--init",
        folder,
        "--data",
        data_dir,
        "--out",
        run,
        "--steps",
        "3",
        "--on-nonfinite",
        "skip",
        *NAN_ARGS,
    )
    assert r.returncode == 0, r.stderr
    ev = metrics(run)
    assert [e["step"] for e in ev if e["event"] == "skip"] == [3]
    assert [e["step"] for e in ev if e["event"] == "train"] == [1, 2, 3]
    assert np.isfinite(ev[-1]["val_nelbo"])
    raw = load_file(str(run / "checkpoints/step-00000003/train_state/raw_model.safetensors"))
    emb = raw.pop("backbone.vocab_embed.embedding")
    # only the poisoned row (never updated: its gradient is zero) is non-finite
    assert torch.isnan(emb[token]).all() and torch.isfinite(torch.cat([emb[:token], emb[token + 1 :]])).all()
    assert all(torch.isfinite(v).all() for v in raw.values())


# --------------------------------------------------------------------------------- bad inputs


def _bad_input_cases(
    root: Path, data_dir: Path, ckpt: Path, ref_run: Path
) -> dict[str, tuple[list, int, str]]:
    """name -> (argv, exit code, text the one-line message must contain)."""
    b = root / "bad"
    b.mkdir()
    os.mkfifo(b / "fifo.txt")
    (b / "dir.txt").mkdir()
    (b / "broken.txt").symlink_to(b / "nowhere.txt")
    (b / "empty.txt").write_text("")
    (b / "afile").write_text("x")
    # a prepared folder at another length, and one from another tokenizer (meta as prepare writes it)
    prepare([str(root / "slice.jsonl")], b / "data16", seq_len=16, progress=False)
    shutil.copytree(data_dir, b / "data_bert")
    meta = json.loads((b / "data_bert/meta.json").read_text())
    meta.update(tokenizer="bert-base-uncased", vocab_size=30523, mask_id=30522, bos_id=101, eos_id=102)
    (b / "data_bert/meta.json").write_text(json.dumps(meta))
    save_model(tiny_model(length=64, seed=1), b / "ckpt64")
    for name in ("no_config", "no_weights", "int_weights", "bad_shape", "garbage_weights"):
        shutil.copytree(ckpt, b / name)
    (b / "no_config/config.json").unlink()
    (b / "no_weights/model.safetensors").unlink()
    t = load_file(str(ckpt / "model.safetensors"))
    save_file(
        {**t, "backbone.blocks.0.attn_out.weight": t["backbone.blocks.0.attn_out.weight"].to(torch.int32)},
        str(b / "int_weights/model.safetensors"),
    )
    save_file(
        {**t, "backbone.blocks.0.attn_out.weight": torch.zeros(64, 32)},
        str(b / "bad_shape/model.safetensors"),
    )
    (b / "garbage_weights/model.safetensors").write_bytes(b"not a safetensors file " * 100)
    good = (ckpt.parent / "drafts.jsonl").read_text().splitlines()
    (b / "garbage.jsonl").write_text("this is not json\n")
    (b / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\x80\n")
    (b / "cut.jsonl").write_text(good[0] + "\n" + good[1][: len(good[1]) // 2])  # a killed writer's last line
    # the cases run at once, and a run folder takes one trainer at a time: one folder per resume
    run = clone_run(ref_run, b / "run", [6])
    run_tok = clone_run(ref_run, b / "run_tok", [6])
    tr = ["--steps", "7", "--warmup", "1", "--batch-size", "4", "-q"]
    draft = ["draft", "--model", ckpt, "-n", "1", *FAST_DRAFT]
    return {
        "source-fifo": (
            ["prepare", b / "fifo.txt", "--out", b / "o1", "--seq-len", L],
            2,
            "not a regular file",
        ),
        "source-dir-named-like-a-file": (
            ["prepare", b / "dir.txt", "--out", b / "o2", "--seq-len", L],
            2,
            "holds no",
        ),
        "source-broken-symlink": (
            ["prepare", b / "broken.txt", "--out", b / "o3", "--seq-len", L],
            2,
            "does not exist",
        ),
        "empty-corpus": (
            ["prepare", b / "empty.txt", "--out", b / "o4", "--seq-len", L],
            1,
            "no text found in",
        ),
        "data-length-vs-init": (
            ["train", "--data", data_dir, "--out", b / "r1", "--init", b / "ckpt64", *tr],
            1,
            "has rows of 32 tokens but the model length is 64",
        ),
        "data-length-vs-resume": (
            ["train", "--data", b / "data16", "--out", run, "--resume", *tr],
            1,
            "has rows of 16 tokens but the model length is 32",
        ),
        "data-tokenizer-vs-init": (
            ["train", "--data", b / "data_bert", "--out", b / "r2", "--init", ckpt, *tr],
            1,
            "was tokenised with 'bert-base-uncased' but the model uses 'gpt2'",
        ),
        "data-tokenizer-vs-resume": (
            ["train", "--data", b / "data_bert", "--out", run_tok, "--resume", *tr],
            1,
            "was tokenised with 'bert-base-uncased' but the model uses 'gpt2'",
        ),
        "checkpoint-without-config": ([*draft[:2], b / "no_config", *draft[3:]], 1, "no config.json"),
        "checkpoint-without-weights": ([*draft[:2], b / "no_weights", *draft[3:]], 1, "no checkpoint in"),
        "init-without-weights": (
            ["train", "--data", data_dir, "--out", b / "r3", "--init", b / "no_weights", *tr],
            1,
            "no checkpoint in",
        ),
        "weights-wrong-dtype": (
            [*draft[:2], b / "int_weights", *draft[3:]],
            1,
            "attn_out.weight has dtype torch.int32, expected a floating-point dtype",
        ),
        "weights-wrong-shape": (
            [*draft[:2], b / "bad_shape", *draft[3:]],
            1,
            "attn_out.weight has shape [64, 32], expected [64, 64]",
        ),
        "weights-not-safetensors": (
            [*draft[:2], b / "garbage_weights", *draft[3:]],
            1,
            "unreadable safetensors file",
        ),
        "jsonl-garbage": (["refine", b / "garbage.jsonl", "--model", ckpt], 1, "line 1 of"),
        "jsonl-binary": (["refine", b / "binary.jsonl", "--model", ckpt], 1, "not UTF-8 text"),
        "jsonl-cut-last-line": (["refine", b / "cut.jsonl", "--model", ckpt], 1, "line 2 of"),
        "output-under-a-file-draft": (
            [*draft, "-o", b / "afile/out.jsonl"],
            1,
            f"{b / 'afile'} is not a folder",
        ),
        "output-under-a-file-train": (
            ["train", "--data", data_dir, "--out", b / "afile/run", *tr],
            1,
            "cannot write",
        ),
        "output-under-a-file-prepare": (
            ["prepare", root / "slice.jsonl", "--out", b / "afile/data", "--seq-len", L],
            1,
            "cannot create the folder",
        ),
    }


@pytest.fixture(scope="module")
def bad_results(root, data_dir, ckpt, ref_run, drafts_file) -> dict:
    """Run every bad-input case at once (they are start-up bound), plus stdout into /dev/full."""
    cases = _bad_input_cases(root, data_dir, ckpt, ref_run)
    with ThreadPoolExecutor(4) as pool, open("/dev/full", "w") as full:
        futs = {k: pool.submit(did, *argv) for k, (argv, _, _) in cases.items()}
        futs["stdout-full-disk"] = pool.submit(
            did, "draft", "--model", ckpt, "-n", "1", *FAST_DRAFT, stdout=full
        )
        results = {k: f.result() for k, f in futs.items()}
    cases["stdout-full-disk"] = ([], 1, "cannot write stdout: No space left on device")
    return {k: (results[k], code, text) for k, (_, code, text) in cases.items()}


BAD_CASES = [
    "source-fifo",
    "source-dir-named-like-a-file",
    "source-broken-symlink",
    "empty-corpus",
    "data-length-vs-init",
    "data-length-vs-resume",
    "data-tokenizer-vs-init",
    "data-tokenizer-vs-resume",
    "checkpoint-without-config",
    "checkpoint-without-weights",
    "init-without-weights",
    "weights-wrong-dtype",
    "weights-wrong-shape",
    "weights-not-safetensors",
    "jsonl-garbage",
    "jsonl-binary",
    "jsonl-cut-last-line",
    "output-under-a-file-draft",
    "output-under-a-file-train",
    "output-under-a-file-prepare",
    "stdout-full-disk",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_error(case, bad_results):
    r, code, text = bad_results[case]
    line = one_line_error(r)
    assert r.returncode == code, (r.returncode, line)
    assert text in line, line


def test_non_utf8_source_is_replaced_with_one_warning(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes(("caf\xe9 au lait " * 20).encode("latin-1"))
    r = did("prepare", src, "--out", tmp_path / "out", "--seq-len", "8")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert warnings == [
        f"did: warning: {src} is not valid UTF-8; undecodable bytes were replaced with U+FFFD"
    ]
    tok = load_tokenizer("gpt2")
    rows = PreparedData(tmp_path / "out").rows("train")
    stream = rows[:, 1:].reshape(-1).tolist()
    fffd = tok.encode("caf\ufffd")
    assert any(stream[i : i + len(fffd)] == fffd for i in range(len(stream)))


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs mount permission, e.g. root outside a sandbox)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the /dev/full case still runs"
        )
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_while_writing(tmpfs, data_dir, ckpt, root):
    # training: the first checkpoint (~100 MB) does not fit
    r = did(
        "train",
        "--data",
        data_dir,
        "--out",
        tmpfs / "run",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "-q",
    )
    line = one_line_error(r)
    assert "cannot write checkpoint" in line and "No space left on device" in line, line
    assert not (tmpfs / "run").exists()  # a failed start removes the run folder it made
    # draft -o: a filler leaves room for about one record
    (tmpfs / "filler").write_bytes(b"\0" * 60_000)
    r = did("draft", "--model", ckpt, "-n", "4", "--batch-size", "4", *FAST_DRAFT, "-o", tmpfs / "out.jsonl")
    last = r.stderr.strip().splitlines()[-1]  # per-record progress lines come first
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        last.startswith(f"did: error: cannot write {tmpfs / 'out.jsonl'}")
        and "No space left on device" in last
    )
    if (tmpfs / "out.jsonl.partial").exists():  # removed when it holds no whole record
        _whole_records((tmpfs / "out.jsonl.partial").read_text())
        (tmpfs / "out.jsonl.partial").unlink()
    # prepare: rows do not fit; nothing is left behind (the folder it made is removed again)
    r = did("prepare", root / "slice.jsonl", "--out", tmpfs / "data", "--seq-len", L)
    assert "No space left on device" in one_line_error(r)
    assert not (tmpfs / "data").exists()


# ------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickled in full, this runs a shell command (writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_pickle_that_would_run_code(ref_run, data_dir, tmp_path):
    run = clone_run(ref_run, tmp_path / "run", [2])
    marker = tmp_path / "pwned"
    ckdir = run / "checkpoints/step-00000002"
    evil = ckdir / "train_state/optimizer.pt"
    torch.save({"state": _Payload(marker)}, evil)
    ck.write_manifest(ckdir)  # a forged manifest: the file looks intact, so the loader itself must refuse
    r = resume(data_dir, run)
    assert "cannot read training state" in one_line_error(r) and str(evil) in r.stderr
    assert not marker.exists()
    # the payload is live: a full unpickle does run it
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        env=ENV,
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()


def test_remote_code_in_a_bd3lm_folder_is_never_imported(ckpt, data_dir, tmp_path):
    folder = tmp_path / "bd3lm"
    folder.mkdir()
    marker = tmp_path / "imported"
    model = tiny_model(length=L, seed=2)
    save_file(
        {k: v.float() for k, v in export_state_dict(model).items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = {
        "architectures": ["BD3LM"],
        "model_type": "bd3lm",
        "block_size": 4,
        "cond_dim": 32,
        "hidden_dim": 64,
        "model_length": L,
        "n_blocks": 2,
        "n_heads": 2,
        "vocab_size": 50258,
        "dropout": 0.1,
        "auto_map": {
            "AutoConfig": "configuration_bd3lm.BD3LMConfig",
            "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM",
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    for mod in ("modeling_bd3lm", "configuration_bd3lm"):
        (folder / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    loaded, _ = load_model(folder)
    assert torch.equal(loaded.vocab_embed.embedding, model.vocab_embed.embedding)
    r = did(
        "train",
        "--init",
        folder,
        "--data",
        data_dir,
        "--out",
        tmp_path / "run",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--block-sizes",
        "4",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", "import modeling_bd3lm"], cwd=folder, env=ENV, timeout=60)
    assert marker.exists()  # the bait works when imported


# -------------------------------------------------------------------------------- determinism


def _timeless(x):
    """A record without its wall-clock fields (top level and per stage)."""
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k != "seconds"}
    return [_timeless(v) for v in x] if isinstance(x, list) else x


def _records(stdout: str) -> list[dict]:
    return [_timeless(json.loads(ln)) for ln in stdout.splitlines()]


@pytest.mark.slow
def test_same_seed_same_samples_from_draft_and_refine(ckpt, tmp_path):
    base = ["draft", "--model", ckpt, "-n", "3", "--seed", "7", *FAST_DRAFT]
    with ThreadPoolExecutor(3) as pool:
        a, b, one, other = pool.map(
            lambda extra: did(*base, *extra),
            [
                ["--batch-size", "3"],
                ["--batch-size", "3"],
                ["--batch-size", "1"],
                ["--batch-size", "3", "--seed", "8"],
            ],
        )
    for r in (a, b, one, other):
        assert r.returncode == 0, r.stderr
    ra, rb, r1 = _records(a.stdout), _records(b.stdout), _records(one.stdout)
    assert len(ra) == 3 and ra == rb  # same seed, same batch: identical records
    # another batch size: same tokens; confidences may differ in the last bits (batch-shaped matmuls)
    assert [r["tokens"] for r in r1] == [r["tokens"] for r in ra]
    for x, y in zip(r1, ra):
        assert np.allclose([c or 0 for c in x["confidence"]], [c or 0 for c in y["confidence"]], atol=1e-6)
    assert [r["tokens"] for r in _records(other.stdout)] != [r["tokens"] for r in ra]

    drafts = tmp_path / "drafts.jsonl"
    drafts.write_text(a.stdout)
    ref = ["refine", drafts, "--model", ckpt, "--stages", "L:0.5", "--seed", "3"]
    with ThreadPoolExecutor(3) as pool:
        a, b, one = pool.map(
            lambda extra: did(*ref, *extra),
            [["--batch-size", "3"], ["--batch-size", "3"], ["--batch-size", "1"]],
        )
    ra, rb, r1 = _records(a.stdout), _records(b.stdout), _records(one.stdout)
    assert len(ra) == 3 and ra == rb
    assert [r["tokens"] for r in r1] == [r["tokens"] for r in ra]
    assert any(
        r["tokens"] != d["tokens"] for r, d in zip(ra, _records(drafts.read_text()))
    )  # it did regenerate
