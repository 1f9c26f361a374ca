"""Outputs that respect what they write to, and every error one line (docs/reliability.md,
"Outputs and errors"). One tiny L = 32 checkpoint and one small prepared folder are shared by
the module; commands run in-process through the real error guard (CliRunner), and in
subprocesses where a second process, a resource limit or the parser itself is the point."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_train import corpus_slice
from typer.testing import CliRunner

from did_cli import cli
from did_cli.io.model_folder import save_model
from did_cli.io.packing import prepare

L = 32
FAST = ["--sampler", "parallel", "--tokens-per-step", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# the real subcommands behind the real error guard, in-process (a subprocess costs seconds)
APP = cli.build_app()


def did(*args, input=None):
    return CliRunner().invoke(APP, [str(a) for a in args], input=input)


def did_proc(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "did_cli", *map(str, args)],
        stdout=kw.pop("stdout", subprocess.PIPE),
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


def one_line_error(r, code: int = 1) -> str:
    """The single `did: error:` line of a failed command: exit `code`, no traceback, no other line."""
    rc = getattr(r, "exit_code", getattr(r, "returncode", None))
    assert rc == code, (rc, r.stderr)
    exc = getattr(r, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), repr(exc)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("did: error: "), lines[0]
    return lines[0]


def no_leftovers(folder: Path) -> None:
    left = [p.name for p in Path(folder).rglob("*") if p.name.endswith((".partial", ".tmp", ".lock"))]
    assert not left, left


def records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    save_model(tiny_model(length=L, seed=3, std=0.08), root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def data(root) -> Path:
    prepare([str(corpus_slice(root / "slice.jsonl", every=200))], root / "data", seq_len=L, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def drafts(root, ckpt) -> Path:
    out = root / "drafts.jsonl"
    r = did("draft", "--model", ckpt, "-n", 2, *FAST, "-o", out)
    assert r.exit_code == 0, r.stderr
    return out


def damaged(root: Path, ckpt: Path, name: str, config=None, tensors=None) -> Path:
    """A copy of the checkpoint with config.json replaced by `config(cfg)` or its tensors edited
    in place by `tensors(dict)`."""
    folder = root / name
    shutil.copytree(ckpt, folder, dirs_exist_ok=True)
    if tensors is not None:
        ts = load_file(str(ckpt / "model.safetensors"))
        tensors(ts)
        save_file(ts, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((ckpt / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(cfg)))
    return folder


# --------------------------------------------------------------- 1. outputs replace what they point at


def test_draft_to_dev_full_fails_in_one_line_and_leaves_the_device(ckpt, root):
    r = did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", "/dev/full")
    assert one_line_error(r) == "did: error: cannot write /dev/full: No space left on device"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert not Path("/dev/full.partial").exists() and not Path("/dev/full.lock").exists()


def test_draft_to_a_named_pipe_writes_through_to_its_reader(ckpt, root):
    fifo = root / "pipe.jsonl"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(
        target=lambda: got.extend(open(fifo, encoding="utf-8").read().splitlines()), daemon=True
    )
    reader.start()
    r = did("draft", "--model", ckpt, "-n", 2, *FAST, "-o", fifo)
    reader.join(30)
    assert r.exit_code == 0, r.stderr
    assert [json.loads(x)["id"] for x in got] == ["draft-0-0", "draft-0-1"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    no_leftovers(root)


def test_symlinked_outputs_are_written_through_the_link(ckpt, data, drafts, root):
    folder = root / "links"
    folder.mkdir()
    (folder / "real.jsonl").write_text("old\n")
    (folder / "out.jsonl").symlink_to("real.jsonl")
    r = did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", folder / "out.jsonl")
    assert r.exit_code == 0, r.stderr
    assert (folder / "out.jsonl").is_symlink() and records(folder / "real.jsonl")[0]["id"] == "draft-0-0"
    # --json of eval-ppl and the page of show, through links too
    (folder / "e.json").symlink_to("e-real.json")
    r = did("eval-ppl", "--model", ckpt, "--data", data, "--draws", 1, "--json", folder / "e.json")
    assert r.exit_code == 0, r.stderr
    assert (folder / "e.json").is_symlink() and "nelbo" in json.loads((folder / "e-real.json").read_text())
    (folder / "page.html").symlink_to("page-real.html")
    r = did("show", drafts, "-o", folder / "page.html")
    assert r.exit_code == 0, r.stderr
    assert (folder / "page.html").is_symlink() and "<html" in (folder / "page-real.html").read_text()
    no_leftovers(folder)


def test_json_and_pages_to_devices_are_written_through(ckpt, data, drafts, root):
    r = did("eval-ppl", "--model", ckpt, "--data", data, "--draws", 1, "--json", "/dev/full")
    assert one_line_error(r) == "did: error: cannot write /dev/full: No space left on device"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    r = did("show", drafts, "-o", "/dev/null")
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_dev_stdout_appended_to_a_file_is_written_through_not_replaced(ckpt, root):
    log = root / "appended.jsonl"
    log.write_text("earlier\n")
    with open(log, "a") as f:
        r = did_proc("draft", "--model", ckpt, "-n", 1, *FAST, "-o", "/dev/stdout", stdout=f)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier" and json.loads(lines[1])["id"] == "draft-0-0" and len(lines) == 2
    no_leftovers(root)


# ------------------------------------------------------------------------ 2. two writers, one output


def test_a_second_writer_of_the_same_output_is_refused_naming_the_first(ckpt, root):
    """No sleeps and no short timeouts: the first writer's first progress line says its lock is
    held (it is taken before any record is written), and after Ctrl-C its `did: interrupted`
    line says it has cleaned up. Why Ctrl-C once took over 60 s: under tests run as a background
    job SIGINT is ignored and the child inherits that, so the writer drafted on through all 400
    samples (the child now gets the default disposition); and the interpreter's final garbage
    collection walks every object torch and transformers made, about 2 s of CPU on an idle core
    and many times that on a loaded 2-core machine (`cli.main` now freezes them out of it)."""
    out = root / "shared.jsonl"
    out.write_text("earlier\n")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "did_cli",
            "draft",
            "--model",
            str(ckpt),
            "-n",
            "400",
            "--no-cache",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even under a background job
    )
    try:
        started = next((ln for ln in first.stderr if ln.startswith("draft-0-0:")), None)
        assert started is not None, "the first writer stopped before its first record"
        msg = one_line_error(did("draft", "--model", ckpt, "-n", 1, *FAST, "-o", out))
        assert f"another did process (pid {first.pid}, did draft) is writing it" in msg, msg
        assert out.read_text() == "earlier\n"  # the earlier output is intact
    finally:
        first.send_signal(signal.SIGINT)
        err = first.stderr.read()  # to the end: the process has cleaned up and exited
    assert "did: interrupted" in err and first.wait() == 130, err
    assert out.read_text() == "earlier\n" and not Path(str(out) + ".lock").exists()
    # the interrupted writer kept its finished records in its recovery file, whole
    partial = Path(str(out) + ".partial")
    assert partial.read_text().endswith("\n")
    assert all(json.loads(x)["schema"] == "did.sample/1" for x in partial.read_text().splitlines())
    partial.unlink()


# ------------------------------------------------------------------------- 3. overwriting without asking


def test_prepare_refuses_a_folder_of_another_preparation_without_force(root):
    src = corpus_slice(root / "slice3.jsonl", every=400)
    out = root / "prep"
    assert did("prepare", src, "--out", out, "--seq-len", 16).exit_code == 0
    before = (out / "train.bin").read_bytes()
    msg = one_line_error(did("prepare", src, "--out", out, "--seq-len", 32))
    assert "already holds prepared data of other sources or settings (seq_len 16" in msg and "--force" in msg
    assert (out / "train.bin").read_bytes() == before and json.loads((out / "meta.json").read_text())[
        "seq_len"
    ] == 16
    assert did("prepare", src, "--out", out, "--seq-len", 16).exit_code == 0  # the same preparation is reused
    r = did("prepare", src, "--out", out, "--seq-len", 32, "--force")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["seq_len"] == 32
    # a user's own train.bin
    mine = root / "mine"
    mine.mkdir()
    (mine / "train.bin").write_bytes(b"my own bytes")
    msg = one_line_error(did("prepare", src, "--out", mine, "--seq-len", 16))
    assert "files that are not this preparation (train.bin)" in msg
    assert (mine / "train.bin").read_bytes() == b"my own bytes"
    no_leftovers(root / "prep")


def test_train_and_quickstart_refuse_folders_that_are_not_theirs(ckpt, data, root):
    # a checkpoint folder as --out: its config.json would be overwritten
    folder = root / "ckpt-as-out"
    shutil.copytree(ckpt, folder)
    before = (folder / "config.json").read_bytes()
    msg = one_line_error(
        did("train", "--data", data, "--out", folder, "--steps", 1, "--preset", "tiny", "-q")
    )
    assert "is not empty (config.json, model.safetensors) and holds no checkpoint" in msg
    msg = one_line_error(
        did("finetune-mixscale", "--init", ckpt, "--data", data, "--out", folder, "--steps", 1, "-q")
    )
    assert "is not empty" in msg
    assert (folder / "config.json").read_bytes() == before
    # quickstart into a folder of someone else's files
    other = root / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine\n")
    msg = one_line_error(did("quickstart", "--out", other))
    assert "holds files that are not a quickstart's (todo.txt)" in msg and "--force" in msg
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]


# ------------------------------------------------------------------------------- 4. non-finite weights


def test_nan_weights_stop_loading_naming_the_tensor(ckpt, drafts, root):
    def poison(t):
        t["backbone.blocks.0.attn_qkv.weight"][3, 5] = float("nan")

    bad = damaged(root, ckpt, "nan-ckpt", tensors=poison)
    for args in (["draft", "--model", bad, "-n", 1], ["refine", drafts, "--model", bad]):
        msg = one_line_error(did(*args))
        assert (
            "tensor backbone.blocks.0.attn_qkv.weight holds 1 non-finite value(s) (first at index [3, 5]: "
            "nan)" in msg
        )


def test_logits_that_overflow_stop_drafting_and_refining_naming_the_step(ckpt, drafts, root):
    def overflow(t):  # finite weights whose logits are +-inf in float32
        t["backbone.output_layer.linear.weight"].fill_(3e38)

    big = damaged(root, ckpt, "big-ckpt", tensors=overflow)
    out = root / "overflow" / "d.jsonl"
    out.parent.mkdir()
    msg = one_line_error(did("draft", "--model", big, "-n", 1, *FAST, "-o", out))
    assert "sample draft-0-0: the model gave non-finite logits at position 1 (block 0 of size 4)" in msg
    msg = one_line_error(did("refine", drafts, "--model", big, "-o", out))
    assert (
        "record 'draft-0-0': the model gave non-finite logits at position" in msg and "refine stage 1" in msg
    )
    assert list(out.parent.iterdir()) == []  # no output, no empty .partial, no lock


# ------------------------------------------------------------------------------------ 5. tracebacks


def test_eval_ppl_checks_its_json_target_before_the_evaluation(ckpt, data, root):
    t0 = time.perf_counter()
    msg = one_line_error(
        did("eval-ppl", "--model", ckpt, "--data", data, "--json", root / "missing" / "x.json")
    )
    assert msg == f"did: error: cannot write {root / 'missing' / 'x.json'}: {root / 'missing'} does not exist"
    assert time.perf_counter() - t0 < 5


def test_json_to_a_full_stdout_is_one_line(ckpt, data):
    with open("/dev/full", "w") as full:
        r = did_proc("eval-ppl", "--model", ckpt, "--data", data, "--draws", 1, "--json", "-", stdout=full)
    assert one_line_error(r) == "did: error: cannot write stdout: No space left on device"


def test_training_on_rows_outside_the_vocabulary_is_one_line_and_leaves_no_run(ckpt, data, root):
    bad = root / "bad-ids"
    shutil.copytree(data, bad)
    rows = np.memmap(bad / "train.bin", dtype=np.uint16, mode="r+")
    rows[L + 7] = 60000  # row 1, position 7: past GPT-2's 50258 ids
    rows.flush()
    del rows
    run = root / "bad-ids-run"
    msg = one_line_error(did("train", "--data", bad, "--out", run, "--steps", 1, "--preset", "tiny", "-q"))
    assert msg.endswith(
        "train.bin: row 1 holds token id 60000 at position 7, outside the vocabulary [0, 50258); "
        "re-run `did prepare`"
    ), msg
    assert not run.exists()
    # the same rows through eval-ppl's test perplexity (the other reader of prepared rows)
    msg = one_line_error(did("eval-ppl", "--model", ckpt, "--data", bad, "--split", "train", "--draws", 1))
    assert "row 1 holds token id 60000 at position 7" in msg


def test_quickstart_out_an_existing_file(root):
    f = root / "a-file"
    f.write_text("x\n")
    assert (
        one_line_error(did("quickstart", "--out", f)) == f"did: error: --out {f}: exists and is not a folder"
    )
    assert f.read_text() == "x\n"


@pytest.mark.parametrize(
    "case, edit, expect",
    [
        ("json-array", lambda c: [c], "expected a JSON object of model settings, got a JSON array"),
        (
            "string-number",
            lambda c: {**c, "hidden_dim": "64"},
            "'hidden_dim' must be an integer, got string \"64\"",
        ),
        ("string-mask-id", lambda c: {**c, "mask_id": "50257"}, "'mask_id' must be an integer, got string"),
        ("heads-not-dividing", lambda c: {**c, "n_heads": 3}, "hidden_dim 64 is not divisible by n_heads 3"),
        ("mask-outside-vocab", lambda c: {**c, "mask_id": 10**6}, "mask_id 1000000 outside vocab_size 50258"),
        ("length-zero", lambda c: {**c, "model_length": 0}, "'model_length' is 0, must be at least 1"),
        ("missing-key", lambda c: {k: v for k, v in c.items() if k != "n_heads"}, "missing 'n_heads'"),
    ],
)
def test_a_damaged_checkpoint_config_is_a_runtime_fault_naming_config_json(ckpt, root, case, edit, expect):
    bad = damaged(root, ckpt, f"cfg-{case}", config=edit)
    msg = one_line_error(did("draft", "--model", bad, "-n", 1), code=1)
    assert msg.startswith(f"did: error: {bad / 'config.json'}: ") and expect in msg, msg


def test_json_nested_very_deep_is_one_line(ckpt, root):
    deep = root / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    for args in (
        ["refine", deep, "--model", ckpt],
        ["eval-ppl", deep],
        ["show", deep, "-o", root / "deep.html"],
    ):
        assert one_line_error(did(*args)).endswith(f"line 1 of {deep}: JSON nested too deeply to be a record")
    prompts = root / "deep-prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert "JSON nested too deeply to be a prompt" in one_line_error(
        did("draft", "--model", ckpt, "--prompts", prompts)
    )
    no_leftovers(root)


# ------------------------------------------------------------------------------------- 6. leftovers


def _limited(max_bytes: int):
    def setup():  # a file-size limit: writes past it fail with EFBIG, like a disk that is full
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return setup


def test_a_write_that_fails_midway_leaves_no_temporary_file(ckpt, data, root):
    folder = root / "limited"
    folder.mkdir()
    (folder / "e.json").write_text('{"earlier": true}\n')
    r = did_proc(
        "eval-ppl",
        "--model",
        ckpt,
        "--data",
        data,
        "--draws",
        1,
        "--json",
        folder / "e.json",
        preexec_fn=_limited(64),
    )
    assert one_line_error(r) == f"did: error: cannot write {folder / 'e.json'}: File too large"
    assert (folder / "e.json").read_text() == '{"earlier": true}\n'
    r = did_proc(
        "prepare", root / "slice.jsonl", "--out", folder / "prep", "--seq-len", L, preexec_fn=_limited(4096)
    )
    assert one_line_error(r) == f"did: error: cannot write {folder / 'prep' / 'train.bin'}: File too large"
    assert not (folder / "prep").exists()  # the folder it made is gone again: no .tmp, no meta.json
    # the second file fails after the first was written: neither is left (a re-run starts clean)
    (folder / "prep2" / "validation.bin").mkdir(parents=True)
    msg = one_line_error(
        did("prepare", root / "slice.jsonl", "--out", folder / "prep2", "--seq-len", L, "--force")
    )
    assert msg == f"did: error: cannot write {folder / 'prep2' / 'validation.bin'}: it is a directory"
    assert sorted(p.name for p in (folder / "prep2").iterdir()) == ["validation.bin"]
    no_leftovers(folder)


# ---------------------------------------------------------------------- 7. exit codes and messages


@pytest.mark.parametrize(
    "args, expect",
    [
        (["draft", "--model", "x", "-n", "many"], "Invalid value for '-n' / '--n'"),
        (["draft", "--modle", "x"], "No such option: --modle"),
        (["refine", "in.jsonl"], "missing option --model"),
        (["drfat"], "No such command 'drfat'."),
    ],
)
def test_parser_errors_are_one_line_with_exit_2(args, expect):
    r = did_proc(*args)
    msg = one_line_error(r, code=2)
    assert expect in msg and "--help" in msg, msg


def test_an_unloadable_tokenizer_is_one_whole_line_quickly(ckpt, root):
    # a hub name without a route to the hub (offline mode off): one line within seconds, not a
    # minute of retries
    hub = damaged(root, ckpt, "hub-tok", config=lambda c: {**c, "tokenizer": "no-such-org/no-such-tokenizer"})
    env = {
        k: v
        for k, v in ENV.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "did_cli", "draft", "--model", str(hub), "-n", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "cannot load tokenizer 'no-such-org/no-such-tokenizer'" in one_line_error(r)
    assert time.perf_counter() - t0 < 30
    # a folder whose library error spans lines: the whole message, not its first line cut at "one of:"
    folder = root / "broken-tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    bad = damaged(root, ckpt, "bad-tok", config=lambda c: {**c, "tokenizer": str(folder)})
    msg = one_line_error(did("draft", "--model", bad, "-n", 1))
    assert (
        f"cannot load tokenizer {str(folder)!r}" in msg
        and "Couldn't instantiate the backend tokenizer from one of: (1)" in msg
    )
    assert not msg.rstrip().endswith(":"), msg


# ------------------------------------------------------------------------------ 8. accepted silently


def _with(drafts: Path, path: Path, edit) -> Path:
    recs = records(drafts)
    edit(recs)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_refine_refuses_repeated_ids_from_a_file_and_from_stdin(ckpt, drafts, root):
    dup = _with(drafts, root / "dup.jsonl", lambda rs: rs.append(rs[0]))
    msg = one_line_error(did("refine", dup, "--model", ckpt, "-o", root / "never.jsonl"))
    assert (
        msg
        == f"did: error: record 3 of {dup}: id 'draft-0-0' repeats record 1 (ids must be unique in a file)"
    )
    assert not (root / "never.jsonl").exists()
    r = did("refine", "-", "--model", ckpt, input=dup.read_text())
    assert (
        r.exit_code == 1
        and r.stderr.splitlines()[-1]
        == "did: error: record 3 of stdin: id 'draft-0-0' repeats record 1 (ids must be unique in a file)"
    )


@pytest.mark.parametrize("value", [7.5, -0.25, "NaN"])
def test_refine_refuses_confidences_outside_0_1(ckpt, drafts, root, value):
    def edit(rs):
        rs[1]["confidence"][5] = value

    path = _with(drafts, root / f"conf-{value}.jsonl", edit)
    if value == "NaN":  # json.dumps wrote the string: make it JSON's NaN literal
        path.write_text(path.read_text().replace('"NaN"', "NaN"))
    msg = one_line_error(did("refine", path, "--model", ckpt))
    assert (
        msg.startswith(f"did: error: line 2 of {path}: 'confidence' ")
        and "at position 5 outside [0, 1]" in msg
    ), msg


def test_a_bad_draft_block_is_reported_as_draft_block(ckpt, data, root):
    msg = one_line_error(
        did(
            "finetune-mixscale",
            "--init",
            ckpt,
            "--data",
            data,
            "--out",
            root / "ft5",
            "--draft-block",
            5,
            "--steps",
            1,
            "-q",
        ),
        code=2,
    )
    assert msg == "did: error: --draft-block 5: block size 5 does not divide the sequence length 32", msg
    assert not (root / "ft5").exists()
