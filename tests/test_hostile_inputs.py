"""Hostile inputs, one line each (docs/reliability.md, "Hostile inputs"): user data escaped on
the terminal, bounded readers for files and streams, JSON integers checked before conversion,
allocation failures that say what to make smaller, schemas of the JSON files we read back,
text that is not text, closed standard streams, `show` validating what it draws, and the
smaller cases (config keys, SIGTERM/SIGHUP, library warnings). Every failing case asserts the
exit code, exactly one `did: error:` line, no traceback and no leftovers."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_hostile_outputs import ENV, FAST, L, did, no_leftovers, one_line_error
from test_train import corpus_slice

from did_cli.io import checkpoint as ck
from did_cli.io.model_folder import save_model
from did_cli.io.packing import prepare

HUGE = "9" * 4400  # an integer literal past Python's 4300-digit conversion limit


def run(*args, stdin=None, preexec=None, env=None, argv_bytes=None) -> subprocess.CompletedProcess:
    argv = argv_bytes or [sys.executable, "-m", "did_cli", *map(str, args)]
    with open(stdin or os.devnull, "rb") as f:
        return subprocess.run(
            argv, stdin=f, capture_output=True, env=env or ENV, timeout=600, preexec_fn=preexec
        )


def text(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A bytes result with str stderr, for one_line_error."""
    r.stderr = r.stderr.decode("utf-8", "replace")
    return r


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-in")


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
    assert did("draft", "--model", ckpt, "-n", 2, *FAST, "-o", out).exit_code == 0
    return out


@pytest.fixture(scope="module")
def trained(root, data) -> Path:
    """A real run of two steps: checkpoints with manifests, best.json, train_state/state.json."""
    run_dir = root / "run"
    r = did("train", "--data", data, "--out", run_dir, "--steps", 2, "--preset", "tiny", "-q", "--warmup", 1)
    assert r.exit_code == 0, r.stderr
    return run_dir


def edited(src: Path, dst: Path, edit) -> Path:
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    edit(recs)
    dst.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


# ------------------------------------------------------------------- 6. terminal injection


def test_record_ids_reach_the_terminal_escaped_and_never_as_markup(ckpt, drafts, root):
    evil = ["\x1b[2J\x1b[31mfake", "[/bold]x"]

    def edit(rs):
        for r, i in zip(rs, evil):
            r["id"] = i

    src = edited(drafts, root / "evil.jsonl", edit)
    out = root / "evil-out" / "r.jsonl"
    out.parent.mkdir()
    r = did("refine", src, "--model", ckpt, *FAST, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "\x1b" not in r.stderr and "\\x1b[2J\\x1b[31mfake: B=" in r.stderr and "[/bold]x: B=" in r.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == evil  # the data is untouched
    no_leftovers(out.parent)
    # an error that names such an id is one escaped line too
    dup = edited(src, root / "evil-dup.jsonl", lambda rs: rs.append(rs[0]))
    msg = one_line_error(did("refine", dup, "--model", ckpt))
    assert "\x1b" not in msg and "repeats record 1" in msg


# ---------------------------------------------------------------------- 7. bounded readers


def _bomb(path: Path) -> Path:
    member = gzip.compress(b"\0" * (1 << 20))  # 1 MiB of zeros in about 1 KiB; 600 members = 600 MiB
    path.write_bytes(member * 600)
    return path


@pytest.fixture(scope="module")
def endless_results(root, ckpt, drafts) -> dict:
    yaml_bomb = root / "bomb.yaml"
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    rows += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    yaml_bomb.write_text("\n".join(rows) + "\n")
    cases = {
        "config-dev-zero": (["draft", "--model", ckpt, "--config", "/dev/zero"], None, 2, "more than 16 MiB"),
        "config-dev-urandom": (
            ["draft", "--model", ckpt, "--config", "/dev/urandom"],
            None,
            2,
            "more than 16",
        ),
        "config-yaml-alias-bomb": (["draft", "--model", ckpt, "--config", yaml_bomb], None, 2, "aliases are"),
        "prompts-stdin-dev-zero": (
            ["draft", "--model", ckpt, "--prompts", "-"],
            "/dev/zero",
            1,
            "line 1 of stdin",
        ),
        "refine-stdin-dev-zero": (["refine", "-", "--model", ckpt], "/dev/zero", 1, "longer than 64 MiB"),
        "show-scores-dev-zero": (
            ["show", drafts, "-o", root / "p.html", "--scores", "/dev/zero"],
            None,
            1,
            "--scores /dev/zero: more than 256 MiB",
        ),
        "prepare-gzip-bomb": (
            ["prepare", _bomb(root / "bomb.jsonl.gz"), "--out", root / "bomb-out"],
            None,
            1,
            "a decompression bomb?",
        ),
    }
    with ThreadPoolExecutor(3) as pool:
        futs = {k: pool.submit(run, *argv, stdin=stdin) for k, (argv, stdin, _, _) in cases.items()}
        return {k: (text(futs[k].result()), code, needle) for k, (_, _, code, needle) in cases.items()}


@pytest.mark.parametrize(
    "case",
    [
        "config-dev-zero",
        "config-dev-urandom",
        "config-yaml-alias-bomb",
        "prompts-stdin-dev-zero",
        "refine-stdin-dev-zero",
        "show-scores-dev-zero",
        "prepare-gzip-bomb",
    ],
)
def test_endless_or_exploding_input_is_one_line_naming_it(case, endless_results, root):
    r, code, needle = endless_results[case]
    assert needle in one_line_error(r, code)
    assert not (root / "p.html").exists() and not (root / "bomb-out").exists()


def _huge_inputs(root: Path, ckpt: Path, drafts: Path, data: Path) -> dict:
    (root / "huge.jsonl").write_text('{"text": "a document", "n": ' + HUGE + "}\n")
    (root / "huge.json").write_text('[{"text": "a document", "n": ' + HUGE + "}]\n")
    rec = drafts.read_text().splitlines()[0]
    (root / "huge-rec.jsonl").write_text(rec.replace('"tokens":[', '"tokens":[' + HUGE + ",", 1) + "\n")
    cfg = root / "huge-cfg"
    shutil.copytree(ckpt, cfg)
    (cfg / "config.json").write_text(
        (cfg / "config.json").read_text().replace('"hidden_dim": 64', f'"hidden_dim": {HUGE}')
    )
    meta = root / "huge-meta"
    shutil.copytree(data, meta)
    (meta / "meta.json").write_text(
        (meta / "meta.json").read_text().replace('"seq_len": 32', f'"seq_len": {HUGE}')
    )
    return {
        "prepare-jsonl-source": ["prepare", root / "huge.jsonl", "--out", root / "o1"],
        "prepare-json-source": ["prepare", root / "huge.json", "--out", root / "o2"],
        "records": ["refine", root / "huge-rec.jsonl", "--model", ckpt],
        "config-json": ["draft", "--model", cfg],
        "meta-json": ["train", "--data", meta, "--out", root / "o3", "-q"],
    }


@pytest.mark.parametrize(
    "case", ["prepare-jsonl-source", "prepare-json-source", "records", "config-json", "meta-json"]
)
def test_json_integers_are_checked_before_conversion(case, root, ckpt, drafts, data):
    (root / case).mkdir()
    msg = one_line_error(did(*_huge_inputs(root / case, ckpt, drafts, data)[case]))
    assert "a number too long to be read" in msg and HUGE not in msg, msg
    assert not any((root / case / o).exists() for o in ("o1", "o2", "o3"))


# ----------------------------------------------------------------- allocation failures


def _address_space(limit: int):
    def setup():  # allocations past it fail at once, as on a machine without that much memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return setup


def test_allocation_failures_say_what_to_make_smaller(ckpt, root):
    r = text(
        run(
            "draft",
            "--model",
            ckpt,
            "-n",
            1,
            "--length",
            65536,
            "--block-size",
            65536,
            "--allow-longer",
            *FAST,  # all 65536 positions of the block are drawn in one call: [65536, V] logits
            preexec=_address_space(6 << 30),
        )
    )
    msg = one_line_error(r)
    assert (
        "out of memory (could not allocate" in msg
        and "make smaller: --batch-size, --length or --block-size" in msg
    )
    big = root / "wide-ckpt"
    shutil.copytree(ckpt, big)
    cfg = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 4_000_000, "n_heads": 2}))
    msg = one_line_error(did("draft", "--model", big, "-n", 1))
    assert "GiB in float32, more than this machine's" in msg and "hidden_dim" in msg, msg


# ------------------------------------------------------------- schemas of our own files


def _copy_ckpt(ckpt: Path, dst: Path, config=None, tensors=None) -> Path:
    shutil.copytree(ckpt, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg)))
    if tensors is not None:
        ts = load_file(str(dst / "model.safetensors"))
        tensors(ts)
        save_file(ts, str(dst / "model.safetensors"))
    return dst


def _manifest(folder: Path, edit) -> None:
    man = json.loads((folder / ck.MANIFEST).read_text())
    edit(man)
    (folder / ck.MANIFEST).write_text(json.dumps(man))


def _damaged(case: str, root: Path, ckpt: Path, data: Path, run_dir: Path) -> tuple[list, str]:
    """(argv, text the one-line message must hold) of one damaged file."""
    d = root / case
    last = ck.latest_checkpoint(run_dir)
    cfg_edits = {
        "config-hidden-null": (
            lambda c: {**c, "hidden_dim": None},
            "'hidden_dim' must be an integer, got null",
        ),
        "config-mlp-ratio-negative": (
            lambda c: {**c, "mlp_ratio": -1},
            "'mlp_ratio' is -1, must be at least 1",
        ),
        "config-bos-outside-vocab": (
            lambda c: {**c, "bos_id": 60000},
            "bos_id 60000 outside vocab_size 50258",
        ),
        "config-dropout-5-via-init": (lambda c: {**c, "dropout": 5}, "'dropout' is 5, must be in [0, 1)"),
    }
    if case in cfg_edits:
        edit, needle = cfg_edits[case]
        bad = _copy_ckpt(ckpt, d, config=edit)
        if case.endswith("via-init"):
            return ["finetune-mixscale", "--init", bad, "--data", data, "--out", root / "ft", "-q"], needle
        return ["draft", "--model", bad, "-n", 1], needle
    if case == "clip-tensor-empty":

        def empty(ts):
            ts["sampling_eps_min"], ts["sampling_eps_max"] = torch.zeros(0), torch.tensor(0.9)

        bad = _copy_ckpt(ckpt, d, tensors=empty)
        return ["draft", "--model", bad, "-n", 1], "tensor sampling_eps_min must hold one finite number"
    if case.startswith("manifest"):
        bad = _copy_ckpt(last, d)
        edit, needle = {
            "manifest-files-a-list": (
                lambda m: m.update(files=list(m["files"])),
                "'files' must be an object",
            ),
            "manifest-without-sha256": (
                lambda m: m["files"]["model.safetensors"].pop("sha256"),
                "has no 'sha256'",
            ),
            "manifest-leaves-the-folder": (
                lambda m: m["files"].update({"../../etc/shadow": {"bytes": 1, "sha256": "0" * 64}}),
                "'files' entry '../../etc/shadow' leaves the checkpoint folder",
            ),
        }[case]
        _manifest(bad, edit)
        return ["draft", "--model", bad, "-n", 1], needle
    run = d / "run"
    if case in ("best-json-a-list", "state-json-string-step"):
        shutil.copytree(run_dir, run)
    if case == "best-json-a-list":
        (run / ck.BEST).write_text("[]")
        return ["draft", "--model", run / "best", "-n", 1], "best.json: expected a JSON object"
    if case == "state-json-string-step":
        st = ck.latest_checkpoint(run) / ck.STATE_DIR / "state.json"
        st.write_text(json.dumps({**json.loads(st.read_text()), "step": "5"}))
        _manifest(st.parents[1], lambda m: m["files"].pop("train_state/state.json"))  # still verifies
        return [
            "train",
            "--data",
            data,
            "--out",
            run,
            "--resume",
            "--steps",
            3,
            "-q",
        ], "'step' must be an integer"
    meta_edits = {
        "meta-seq-len-abc": ({"seq_len": "abc"}, "'seq_len' must be an integer, got string"),
        "meta-dtype-foo": ({"dtype": "foo"}, "'dtype' is 'foo', must be one of 'uint16', 'uint32'"),
        "meta-dtype-float32": ({"dtype": "float32"}, "'dtype' is 'float32'"),
        "meta-splits-a-list": ({"splits": []}, "'splits' must be an object, got array"),
    }
    change, needle = meta_edits[case]
    shutil.copytree(data, d)
    (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), **change}))
    return ["train", "--data", d, "--out", root / f"{case}-run", "-q"], needle


DAMAGED = [
    "config-hidden-null",
    "config-mlp-ratio-negative",
    "config-bos-outside-vocab",
    "config-dropout-5-via-init",
    "clip-tensor-empty",
    "manifest-files-a-list",
    "manifest-without-sha256",
    "manifest-leaves-the-folder",
    "best-json-a-list",
    "state-json-string-step",
    "meta-seq-len-abc",
    "meta-dtype-foo",
    "meta-dtype-float32",
    "meta-splits-a-list",
]


@pytest.mark.parametrize("case", DAMAGED)
def test_every_field_of_our_json_files_is_checked_before_use(case, root, ckpt, data, trained):
    args, needle = _damaged(case, root, ckpt, data, trained)
    msg = one_line_error(did(*args))
    assert needle in msg, msg
    assert not (root / "ft").exists() and not (root / f"{case}-run").exists()


# --------------------------------------------------------------- text that is not text


def test_text_that_is_not_text_is_one_line_and_text_is_utf8_whatever_the_locale(ckpt, drafts, root):
    src = edited(drafts, root / "surrogate.jsonl", lambda rs: rs[0].update(id="\ud800"))
    msg = one_line_error(did("refine", src, "--model", ckpt))
    assert "'id' holds an unpaired surrogate (\\ud800), which is not text" in msg, msg
    argv = [
        sys.executable.encode(),
        b"-m",
        b"did_cli",
        b"draft",
        b"--model",
        bytes(ckpt),
        b"--prompt",
        b"caf\xe9",
    ]
    msg = one_line_error(text(run(argv_bytes=argv)), 2)
    assert "--prompt 'caf\\xe9': not UTF-8 text" in msg, msg
    r = run(
        "draft", "--model", ckpt, "-n", 1, *FAST, "--prompt", "Café", env={**ENV, "PYTHONIOENCODING": "ascii"}
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.decode("utf-8"))["text"].startswith("Café")


# ------------------------------------------------------------- closed standard streams


def _closing(fd: int):
    return lambda: os.close(fd)


def test_closed_standard_streams(ckpt, root):
    msg = one_line_error(text(run("draft", "--model", ckpt, "-n", 1, *FAST, preexec=_closing(1))))
    assert msg == "did: error: cannot write stdout: it is closed; pass -o FILE (or give the command a stdout)"
    msg = one_line_error(text(run("refine", "-", "--model", ckpt, preexec=_closing(0))))
    assert msg == "did: error: cannot read stdin: it is closed; pass a file instead of '-'"
    out = root / "closed-stdout.jsonl"  # with -o, a closed stdout loses nothing
    r = run("draft", "--model", ckpt, "-n", 1, *FAST, "-o", out, preexec=_closing(1))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["id"] == "draft-0-0"
    assert run("draft", "--model", root / "nowhere", preexec=_closing(2)).returncode == 1


# ----------------------------------------------------------------- show validates records


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda r: r.update(stages=[{"block_size": 32, "remasked": 3}]),
            "'stages' entry 1: 'remasked' must be",
        ),
        (lambda r: r.update(stages=["B=32"]), "'stages' entry 1 is a str, not an object"),
        (lambda r: r.update(stages=[{"remasked": [99]}]), "'remasked' holds a position outside [0, 32)"),
        (lambda r: r.update(draft_tokens=["x"] * 32), "'draft_tokens' must be a list of integers"),
    ],
    ids=["remasked-an-int", "stage-a-string", "remasked-outside", "draft-tokens-strings"],
)
def test_show_validates_the_records_it_draws(edit, needle, drafts, root, request):
    src = edited(drafts, root / f"show-{request.node.callspec.id}.jsonl", lambda rs: edit(rs[0]))
    page = root / f"show-{request.node.callspec.id}.html"
    msg = one_line_error(did("show", src, "-o", page))
    assert "line 1 of" in msg and needle in msg, msg
    assert not page.exists()


# ------------------------------------------------------------------------- 8. smaller


def test_config_files_with_two_spellings_of_a_key_or_a_folder_without_config(ckpt, root):
    both = root / "both.yaml"
    both.write_text("batch-size: 2\nbatch_size: 3\n")
    msg = one_line_error(did("draft", "--model", ckpt, "--config", both), 2)
    assert "keys 'batch-size' and 'batch_size' name the same option" in msg
    (root / "not-a-run").mkdir()
    msg = one_line_error(did("draft", "--model", ckpt, "--config", root / "not-a-run"), 2)
    assert "a folder without config.json (give a config file, or a run folder)" in msg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(sig, ckpt, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "did_cli", "draft", "--model", str(ckpt), "-n", "40", "--batch-size", "1"]
    proc = subprocess.Popen(argv + FAST + ["-o", str(out)], stderr=subprocess.PIPE, text=True, env=ENV)
    next(ln for ln in proc.stderr if ln.startswith("draft-0-0:"))  # its record is on disk
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=600) == -sig, rest  # it still ends by that signal
    assert f"did: terminated ({signal.Signals(sig).name})" in rest and "Traceback" not in rest, rest
    kept = tmp_path / "out.jsonl.partial"
    assert f"kept in {kept}" in rest, rest
    assert not (tmp_path / "out.jsonl.lock").exists() and not out.exists()
    assert json.loads(kept.read_text().splitlines()[0])["id"] == "draft-0-0" and kept.read_text().endswith(
        "\n"
    )


def test_library_warnings_stay_off_stderr_unless_verbose(ckpt, tmp_path):
    """A library that warns while a command runs (here torch, made to warn and log at import by
    a sitecustomize module, as real versions do for deprecations) shows nothing on stderr but
    did's own lines; `did --verbose` shows it."""
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins, logging, warnings\n"
        "real = builtins.__import__\n"
        "def hook(name, *a, **k):\n"
        "    m = real(name, *a, **k)\n"
        "    if name == 'torch' and not getattr(hook, 'done', False):\n"
        "        hook.done = True\n"
        "        warnings.warn('TypedStorage is deprecated', UserWarning)\n"
        "        logging.getLogger('transformers').warning('a transformers warning')\n"
        "    return m\n"
        "builtins.__import__ = hook\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    bad = ["draft", "--model", ckpt, "-n", 1, "--length", 7, "--allow-longer"]
    msg = one_line_error(text(run(*bad, env=env)), 2)
    assert "does not divide the sequence length 7" in msg, msg
    loud = text(run("--verbose", *bad, env=env)).stderr
    assert "TypedStorage is deprecated" in loud and "a transformers warning" in loud, loud
