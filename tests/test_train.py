"""Training loop, exact resume, distillation, perplexity evaluation and the train/finetune/eval CLI."""

import json
import math

import numpy as np
import pytest
import torch

from kvslim.cli import main
from kvslim.eval.perplexity import eval_ppl, model_perplexity
from kvslim.eval.tokenizer import train_bpe
from kvslim.eval.tokens import load_tokens, parse_source, save_tokens
from kvslim.testing import tiny_model, tiny_spec
from kvslim.train import (
    TrainConfig,
    build_model,
    chunked_distill_loss,
    distill_loss,
    finetune,
    get_batch,
    lr_at,
    mean_kl,
    train,
)

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")


def stream(n=6000, seed=0, vocab=V):
    """A learnable token stream: a random 40-token motif repeated, 10 % of tokens replaced by noise."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (40,), generator=g)
    x = motif.repeat(n // 40 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.1
    x[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return x


def small(name="gqa-2", seed=0):
    return build_model(
        tiny_spec(name, num_heads=4, head_dim=8, hidden_size=32), vocab_size=V, num_layers=2, seed=seed
    )


CFG = {"batch_size": 8, "seq_len": 32, "lr": 1e-2, "log_every": 1, "device": "cpu"}


def english(n_words=6000, seed=0):
    text = (
        "the of and to in a is that for it as was with be by on not he this are or his from at which "
        "but have an they you were their one all we can her has there been if more when will would who "
        "so no nation people congress government states united year war law country"
    )
    words = text.split()
    rng = np.random.default_rng(seed)
    out = []
    for i, w in enumerate(rng.choice(words, n_words)):
        out.append(w + (".\n\n" if i % 97 == 96 else ". " if i % 13 == 12 else " "))
    return "".join(out)


@pytest.mark.parametrize("name", ["gqa-2", "gta-2", "gla-2"])
def test_loss_goes_down(name):
    model = small(name)
    h = train(model, stream(), config=TrainConfig(steps=30, **CFG), progress=False)
    losses = [r["loss"] for r in h["train"]]
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(V), abs=0.3)  # starts near uniform
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0


def test_resume_matches_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=12, warmup_steps=3, **CFG)
    data, val = stream(), stream(2000, seed=1)
    a = small(seed=0)
    ha = train(a, data, config=cfg, val_tokens=val, out_dir=tmp_path / "a", progress=False)
    b = small(seed=0)
    hb1 = train(b, data, config=cfg, val_tokens=val, out_dir=tmp_path / "b", stop_after=5, progress=False)
    assert hb1["step"] == 5 and (tmp_path / "b" / "checkpoint.pt").is_file()
    c = small(seed=7)  # different init: everything must come from the checkpoint
    hc = train(c, data, config=cfg, val_tokens=val, out_dir=tmp_path / "b", progress=False)
    assert hc["step"] == 12
    assert [r["step"] for r in hc["train"]] == list(range(1, 13))
    for ra, rc in zip(ha["train"], hc["train"]):
        assert rc["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), ra["step"]
    assert hc["val"][-1]["loss"] == pytest.approx(ha["val"][-1]["loss"], rel=1e-6)
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()):
        torch.testing.assert_close(pc, pa, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_rejects_changed_settings(tmp_path):
    data = stream()
    train(small(), data, config=TrainConfig(steps=4, **CFG), out_dir=tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(
            small(),
            data,
            config=TrainConfig(steps=4, **{**CFG, "lr": 1e-3}),
            out_dir=tmp_path,
            progress=False,
        )


def test_schedule_and_batches():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(9, 100))
    data = torch.arange(1000)
    c = TrainConfig(steps=5, batch_size=4, seq_len=16, seed=3)
    x, y = get_batch(data, 2, 0, c)
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    assert torch.equal(get_batch(data, 2, 0, c)[0], x)
    assert not torch.equal(get_batch(data, 3, 0, c)[0], x)


def test_attention_only_freezes_the_rest():
    model = small()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = train(model, stream(), config=TrainConfig(steps=3, attention_only=True, **CFG), progress=False)
    assert h["params"] == sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".self_attn." in n), n


def test_uniform_model_ppl_equals_vocab(tmp_path):
    model = tiny_model(tiny_spec("mla"), vocab=V)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: p = 1/V everywhere
    ids = stream(1000)
    r = model_perplexity(model, ids, seq_len=50, batch_size=3, device="cpu")
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["tokens"] == 1000 - 1000 // 50  # every window's first token is context only
    model.save_pretrained(tmp_path / "uni")
    save_tokens(ids, tmp_path / "ids.npy")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(tmp_path / "uni"),
                "--text",
                str(tmp_path / "ids.npy"),
                "--seq-len",
                "50",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())[0]["ppl"] == pytest.approx(V, rel=1e-6)
    rows = eval_ppl(model=tmp_path / "uni", texts=[ids], seq_len=1000, device="cpu", progress=False)
    assert rows[0]["ppl"] == pytest.approx(V, rel=1e-6) and rows[0]["tokens"] == 999


def test_distill_loss_properties():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    assert float(distill_loss(t, t)) == pytest.approx(0, abs=1e-6)
    assert float(distill_loss(s, t)) > 0.1
    kl = (F_softmax(t) * (F_softmax(t).log() - F_softmax(s).log())).sum(-1).mean()
    assert float(distill_loss(s, t)) == pytest.approx(float(kl), rel=1e-5)
    assert float(distill_loss(s, t, top_k=V)) == pytest.approx(float(kl), rel=1e-5)
    assert float(distill_loss(s, t, top_k=5)) > 0
    assert float(distill_loss(t, t, top_k=5)) > 0  # student mass outside the top-5 still costs
    assert float(distill_loss(s, t, temperature=2.0)) != pytest.approx(float(kl))
    with pytest.raises(ValueError, match="shape"):
        distill_loss(s, t[..., :-1])


@pytest.mark.parametrize("chunk,top_k,temperature", [(1, None, 1.0), (4, None, 2.0), (7, 5, 1.0), (100, None, 1.0)])
def test_chunked_distill_loss_equals_full(chunk, top_k, temperature):
    """Same loss and gradients as distill_loss on full logits, for chunks that do and don't divide the positions."""
    torch.manual_seed(0)
    D = 12
    s_head, t_head = torch.nn.Linear(D, V, bias=False), torch.nn.Linear(D, V, bias=False).requires_grad_(False)
    hs, ht = torch.randn(2, 9, D, requires_grad=True), torch.randn(2, 9, D)
    full = distill_loss(s_head(hs), t_head(ht), temperature=temperature, top_k=top_k)
    g_full = torch.autograd.grad(full, [hs, s_head.weight])
    part = chunked_distill_loss(hs, ht, s_head, t_head, chunk=chunk, temperature=temperature, top_k=top_k)
    g_part = torch.autograd.grad(part, [hs, s_head.weight])
    assert part.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no graph: plain blocks, same value
        assert float(chunked_distill_loss(hs, ht, s_head, t_head, chunk=chunk, temperature=temperature,
                                          top_k=top_k)) == pytest.approx(float(full), rel=1e-5)
    with pytest.raises(ValueError, match="leading"):
        chunked_distill_loss(hs, ht[:, :-1], s_head, t_head)
    with pytest.raises(ValueError, match="chunk"):
        chunked_distill_loss(hs, ht, s_head, t_head, chunk=0)


def F_softmax(x):
    return torch.softmax(x.double(), -1)


@pytest.mark.parametrize("top_k", [None, 8])
def test_distillation_reduces_kl(top_k):
    teacher = small("gqa-2", seed=1)
    train(teacher, stream(), config=TrainConfig(steps=15, **CFG), progress=False)  # a non-trivial teacher
    student = small("gta-2", seed=2)
    val = stream(1500, seed=5)
    kl0 = mean_kl(student, teacher, val, seq_len=32, batch_size=8, max_tokens=None, device=torch.device("cpu"))
    _, h = finetune(
        model=student,
        teacher=teacher,
        text=stream(),
        val_text=val,
        progress=False,
        **{**CFG, "lr": 5e-3, "steps": 25, "top_k": top_k, "eval_every": 25},
    )
    assert h["val"][0]["kl"] == pytest.approx(kl0, rel=1e-5)
    assert h["val"][-1]["kl"] < 0.5 * kl0


def test_token_sources(tmp_path):
    ids = stream(500)
    save_tokens(ids, tmp_path / "a.npy")
    assert torch.equal(load_tokens(tmp_path / "a.npy"), ids)
    ids.numpy().astype(np.uint16).tofile(tmp_path / "a.bin")
    assert torch.equal(load_tokens(str(tmp_path / "a.bin")), ids)
    assert parse_source("sotu-eval") == ("sotu", "eval")
    assert parse_source("moby-dick", "eval") == ("moby-dick", "eval")
    assert parse_source("shakespeare-train") == ("shakespeare", "calib")
    assert parse_source("sotu:calib") == ("sotu", "calib")
    assert parse_source(str(tmp_path / "a.npy")) is None
    np.save(tmp_path / "f.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError, match="integers"):
        load_tokens(tmp_path / "f.npy")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="neither an existing file nor a corpus"):
        load_tokens(tmp_path / "missing.txt", tokenizer="x")
    tok = train_bpe(english(2000), 300)
    assert len(tok) == 300
    assert tok.decode(tok.encode("the nation was", add_special_tokens=False)) == "the nation was"


def test_cli_train_eval_finetune(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(english(8000, seed=0))
    (tmp_path / "val.txt").write_text(english(1500, seed=1))
    m = tmp_path / "m"
    common = ["--seq-len", "32", "--batch-size", "8", "--device", "cpu", "--quiet"]
    rc = main(
        [
            "train",
            "--preset",
            "gta-2",
            "--heads",
            "4",
            "--head-dim",
            "8",
            "--layers",
            "1",
            "--text",
            str(tmp_path / "train.txt"),
            "--val-text",
            str(tmp_path / "val.txt"),
            "--tokenizer",
            "bpe-300",
            "--steps",
            "20",
            "--lr",
            "1e-2",
            "--eval-every",
            "10",
            "--out",
            str(m),
            *common,
        ]
    )
    assert rc == 0
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_log.csv",
        "curves.png",
        "run/checkpoint.pt",
    ):
        assert (m / f).is_file(), f
    log = (m / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,tokens,lr,loss") and len(log) >= 4
    hist = json.loads((m / "history.json").read_text())
    assert hist["val"][-1]["loss"] < hist["val"][0]["loss"]  # validation loss went down
    out = capsys.readouterr().out
    assert "gta-2" in out and "validation loss" in out

    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(m),
                "--text",
                str(tmp_path / "val.txt"),
                "--seq-len",
                "32",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    ppl = json.loads((tmp_path / "e.json").read_text())[0]["ppl"]
    assert ppl == pytest.approx(hist["val"][-1]["ppl"], rel=1e-4)  # same windows as the loop's validation

    f = tmp_path / "f"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(m),
                "--teacher",
                str(m),
                "--text",
                str(tmp_path / "train.txt"),
                "--val-text",
                str(tmp_path / "val.txt"),
                "--steps",
                "3",
                "--top-k",
                "16",
                "--attention-only",
                "--out",
                str(f),
                *common,
            ]
        )
        == 0
    )
    assert (f / "model.safetensors").is_file() and (f / "tokenizer.json").is_file()
    assert "KL to teacher" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--preset", "mha", "--text", "/nonexistent/corpus.txt", "--out", "X"],
            "/nonexistent/corpus.txt",
        ),
        (["train", "--preset", "mha", "--text", "T", "--lr", "-1", "--out", "X"], "lr"),
        (["train", "--preset", "mha", "--text", "T", "--steps", "0", "--out", "X"], "steps"),
        (["eval", "ppl", "--model", "/nonexistent/model", "--text", "T"], "/nonexistent/model"),
        (["finetune", "--model", "M", "--text", "T", "--loss", "distill", "--out", "X"], "teacher"),
        (
            [
                "train",
                "--preset",
                "mha",
                "--text",
                "/nonexistent/ids.npy",
                "--tokenizer",
                "none",
                "--val-text",
                "none",
                "--out",
                "X",
            ],
            "does not exist",
        ),
    ],
)
def test_cli_bad_inputs(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "T").write_text(english(300))
    ids = stream(500)
    save_tokens(ids, tmp_path / "ids.npy")
    small().save_pretrained(tmp_path / "M")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_vocab_mismatch_is_clear():
    with pytest.raises(ValueError, match="vocab_size"):
        train(small(), torch.arange(200) % (V + 5), config=TrainConfig(steps=1, **CFG), progress=False)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="teacher"):
        train(small(), stream(), config=TrainConfig(steps=1, loss="distill", **CFG), progress=False)
