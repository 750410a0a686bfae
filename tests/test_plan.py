"""Planner: the paper's numbers (seed 000 Tab. 5), TP duplication, AI, capacity, CLI."""

import json

import pytest

from kvslim.cli import main
from kvslim.plan import GPU, GPUS, compare, format_plan, plan, plot_roofline
from kvslim.spec import AttentionSpec

P = AttentionSpec.preset
KW = {"batch": 1, "context": 8192}


@pytest.mark.parametrize(
    "name, tp1, tp2",
    [("gta-4", 1152, 640), ("gla-2", 1152, 640), ("mla", 1152, 1152), ("gqa-4", 2048, 1024)],
)
def test_paper_bytes_per_token(name, tp1, tp2):
    assert plan(P(name), tp=1, **KW).bytes_per_token_device == tp1
    assert plan(P(name), tp=2, **KW).bytes_per_token_device == tp2
    assert plan(P(name), tp=2, **KW).bytes_per_token == tp1


def test_dtype_scales_bytes():
    assert plan(P("gta-4"), dtype="fp32", **KW).bytes_per_token_device == 2304


@pytest.mark.parametrize("name, tp, fp8, bf16", [
    ("mla", 1, 656, 1152),  # FlashMLA's row: 512 e4m3 + 4 fp32 scales + 64 bf16 RoPE
    ("mla", 2, 656, 1152),  # the latent is replicated
    ("gla-2", 1, 656, 1152),  # 2 x 256 e4m3 + 4 scales + 64 bf16
    ("gla-2", 2, 400, 640),  # 256 e4m3 + 2 scales + 64 bf16 = 392, padded to 16 B: 400 per rank
    ("gta-4", 1, 656, 1152),  # 4 x 128 e4m3 + 4 scales + 64 bf16
    ("gqa-4", 1, 1056, 2048),  # K and V: 1024 e4m3 + 8 scales, no plain part
    ("gqa-4", 2, 528, 1024),
])
def test_fp8_rows_count_scales_and_the_bf16_rope_key(name, tp, fp8, bf16):
    r8, r16 = plan(P(name), tp=tp, dtype="fp8", **KW), plan(P(name), tp=tp, **KW)
    assert r8.bytes_per_token_device == fp8 and r16.bytes_per_token_device == bf16
    assert r8.kv_bytes_layer == KW["batch"] * KW["context"] * fp8
    assert r8.max_sequences >= r16.max_sequences * (bf16 // fp8)
    assert P(name).row_format("fp8", tp).row_bytes == fp8  # one description: planner = cache layout


@pytest.mark.parametrize(
    "name, tp, d",
    [
        ("gqa-8", 8, 1),
        ("gqa-8", 16, 2),
        ("mla", 1, 1),
        ("mla", 2, 2),
        ("mla", 8, 8),
        ("gla-2", 2, 1),
        ("gla-2", 4, 2),
        ("gta-4", 4, 1),
        ("mha", 16, 1),
        ("mqa", 4, 4),
    ],
)
def test_duplication(name, tp, d):
    r = plan(P(name), tp=tp, **KW)
    s = r.spec
    assert r.duplication == d == -(-tp * s.group_size // s.num_heads)
    assert r.redundancy_free == (d == 1) == (s.group_size <= s.num_heads // tp)


@pytest.mark.parametrize("name", ["mha", "mqa", "gqa-4", "gqa-8"])
def test_ai_long_context_separate(name):
    r = plan(P(name), batch=8, context=1 << 20)
    assert r.ai_per_byte == pytest.approx(r.ai_approx, rel=0.02)
    assert r.ai_per_element == pytest.approx(2 * r.ai_per_byte)  # bf16


@pytest.mark.parametrize("name", ["gta-4", "gta-8", "mla", "gla-2", "gla-4"])
def test_ai_long_context_tied(name):
    # Tied kinds reach ~2 g_q: the shared RoPE key adds bytes (and, for latents, FLOPs), so
    # the exact value is within ~12 % of the approximation.
    r = plan(P(name), batch=8, context=1 << 20)
    s = r.spec
    exact = 2 * s.num_heads * (s.nope_dim + s.rope_dim + s.state_dim) / (s.row_dim * 2)
    assert r.ai_per_byte == pytest.approx(exact, rel=0.02)
    assert r.ai_per_byte == pytest.approx(r.ai_approx, rel=0.12)


def test_mla_ai_halves_under_tp():
    one, two = (plan(P("mla"), tp=t, batch=8, context=1 << 20) for t in (1, 2))
    assert two.ai_per_byte == pytest.approx(one.ai_per_byte / 2, rel=0.01)


def test_roofline_time():
    r = plan(P("gqa-4"), batch=4, context=4096, gpu="h100", num_layers=10)
    g = GPUS["h100"]
    expect = max(r.bytes_layer / (g.bandwidth_tbs * 1e12), r.flops_layer / (g.tflops * 1e12))
    assert r.time_layer_s == pytest.approx(expect)
    assert r.time_attn_s == pytest.approx(10 * expect)
    assert r.bound == "memory"
    assert r.kv_bytes_layer == 4 * 4096 * 2048
    assert r.flops_layer == 2 * 4 * 16 * 4096 * 256
    # q_len = 64 on MQA crosses the ridge.
    assert plan(P("mqa"), batch=1, context=8192, q_len=64).bound == "compute"
    assert plan(P("gqa-4"), gpu="h200", **KW).time_layer_s < r.time_layer_s


def test_weights_and_capacity():
    base = plan(P("gqa-4"), **KW)
    w = plan(P("gqa-4"), weights_bytes=int(16e9), **KW)
    assert base.time_with_weights_s is None
    assert w.time_with_weights_s > w.time_attn_s
    assert w.max_sequences < base.max_sequences
    per_seq = 8192 * 32 * 2048
    assert base.max_sequences == int(0.9 * 80e9 // per_seq)
    assert plan(P("gqa-4"), weights_bytes=int(100e9), **KW).max_sequences == 0


def test_max_sequences_monotone_in_cache_size():
    names = ["mqa", "gta-4", "gqa-4", "gqa-8", "mha"]
    rs = sorted((plan(P(n), **KW) for n in names), key=lambda r: r.bytes_per_token_device)
    seqs = [r.max_sequences for r in rs]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] > seqs[-1]
    mem = [plan(P("gqa-4"), mem_util=u, **KW).max_sequences for u in (0.5, 0.7, 0.9, 1.0)]
    assert mem == sorted(mem)


def test_custom_gpu():
    g = GPU("toy", bandwidth_tbs=1.0, tflops=100.0, memory_gb=10.0)
    assert g.ridge == 100
    assert plan(P("mla"), gpu=g, **KW).gpu is g
    with pytest.raises(ValueError, match="bandwidth_tbs"):
        GPU("bad", bandwidth_tbs=0, tflops=1.0, memory_gb=1.0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tp": 3}, "tp"),
        ({"tp": 0}, "tp"),
        ({"batch": 0}, "batch"),
        ({"context": -1}, "context"),
        ({"q_len": 0}, "q_len"),
        ({"dtype": "int3"}, "dtype"),
        ({"gpu": "a100x"}, "gpu"),
        ({"num_layers": 0}, "num_layers"),
        ({"mem_util": 1.5}, "mem_util"),
        ({"weights_bytes": -1}, "weights_bytes"),
    ],
)
def test_bad_input_names_field(kwargs, field):
    args = {"batch": 1, "context": 128} | kwargs
    with pytest.raises(ValueError, match=field):
        plan(P("gqa-4"), **args)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec"):
        plan("gqa-4", batch=1, context=1)


def test_format_and_compare():
    text = format_plan(plan(P("gla-2"), tp=2, weights_bytes=int(3e9), **KW))
    assert "640 bytes" in text and "redundancy-free" in text and "attention + weights" in text
    table = compare([P(n) for n in ("gqa-4", "gta-4", "mla", "gla-2")], tp=[1, 2], **KW)
    assert "TP=1" in table and "TP=2" in table
    pivot = table.split("per device (bf16):")[1]
    rows = {line.split()[0]: line.split()[1:] for line in pivot.strip().splitlines()[2:]}
    assert rows == {
        "gqa-4": ["2048", "1024"],
        "gta-4": ["1152", "640"],
        "mla": ["1152", "1152"],
        "gla-2": ["1152", "640"],
    }


def test_plot_written(tmp_path):
    path = tmp_path / "roof.png"
    rs = [plan(P(n), tp=t, **KW) for n in ("gqa-4", "mla") for t in (1, 2)]
    plot_roofline(rs, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare(capsys, tmp_path):
    png = tmp_path / "r.png"
    assert main(["plan", "--compare", "gqa-4,gta-4,mla,gla-2,mha", "--tp", "1,2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    pivot = out.split("per device (bf16):")[1]
    rows = {line.split()[0]: line.split()[1:] for line in pivot.strip().splitlines()[2:] if line.strip()}
    assert rows["gta-4"] == ["1152", "640"] and rows["mla"] == ["1152", "1152"]
    assert rows["gla-2"] == ["1152", "640"] and rows["gqa-4"] == ["2048", "1024"]
    assert png.exists()


def test_cli_single(capsys):
    assert main(["plan", "--preset", "gta-4", "--tp", "2", "--params", "1.5", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "320 elements, 640 bytes" in out and "attention + weights" in out


def test_cli_explicit_and_hf(capsys, tmp_path):
    assert (
        main(
            [
                "plan",
                "--kind",
                "gla",
                "--latent-heads",
                "2",
                "--latent-dim",
                "256",
                "--rope-dim",
                "64",
                "--tp",
                "2",
            ]
        )
        == 0
    )
    assert "640 bytes" in capsys.readouterr().out
    cfg = {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "num_hidden_layers": 27,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", "--hf-config", str(path), "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "1152 bytes" in out and "27 layers" in out and "H200" in out


def test_cli_custom_gpu(capsys):
    assert (
        main(
            [
                "plan",
                "--preset",
                "mla",
                "--gpu",
                "custom",
                "--bandwidth",
                "1",
                "--flops",
                "100",
                "--memory",
                "24",
            ]
        )
        == 0
    )
    assert "custom (1.0 TB/s, 100 TFLOP/s, 24 GB)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, field",
    [
        (["plan", "--preset", "gqa-4", "--tp", "3"], "tp"),
        (["plan", "--preset", "gqa-4", "--batch", "0"], "batch"),
        (["plan", "--preset", "gqa-4", "--gpu", "custom"], "--bandwidth"),
        (["plan"], "spec"),
        (["plan", "--preset", "gqa-4", "--kv-heads", "2"], "--kind"),
    ],
)
def test_cli_errors(argv, field, capsys):
    assert main(argv) == 2
    assert field in capsys.readouterr().err
