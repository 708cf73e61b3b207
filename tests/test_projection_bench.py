"""benchmarks/projection_bench.py: the 8B layer it times has the real models' size, the
projection is the documented formula, and a run writes its result file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("projection_bench",
                                                  ROOT / "benchmarks" / "projection_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("model, billions", [("LLaDA-8B", 8.02), ("SDAR-8B", 8.19)])
def test_layers_and_tables_add_up_to_the_published_parameter_count(bench, model, billions):
    # built on the meta device: the real widths without allocating 0.4 GB per layer
    shape = bench.MODELS[model]
    with torch.device("meta"):
        layer = bench.DecoderLayer(shape)
    per_layer = sum(p.numel() for p in layer.parameters())
    total = shape.layers * per_layer + 2 * shape.vocab * shape.hidden  # untied table + head
    assert total / 1e9 == pytest.approx(billions, rel=0.01)


def test_grouped_query_layer_matches_the_same_layer_with_repeated_key_value_heads(bench):
    grouped_shape = bench.ModelShape(vocab=10, hidden=32, intermediate=48, layers=1, heads=4,
                                     kv_heads=2)
    torch.manual_seed(0)
    grouped = bench.DecoderLayer(grouped_shape).eval()
    full = bench.DecoderLayer(bench.ModelShape(**{**grouped_shape.__dict__, "kv_heads": 4}))
    state = grouped.state_dict()
    head_dim = 8
    for name in ("k_proj.weight", "v_proj.weight"):
        # KV head j serves query heads 2j and 2j+1: repeat its rows per query head
        rows = state[name].view(2, head_dim, -1)
        state[name] = rows.repeat_interleave(2, 0).reshape(4 * head_dim, -1)
    full.load_state_dict(state)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), full.eval()(x))


def test_projection_is_layers_times_layer_plus_head_against_that_plus_the_op(bench):
    shape = bench.ModelShape(vocab=10, hidden=8, intermediate=8, layers=32, heads=1, kv_heads=1)
    times = {"layer": 0.5, "head": 4.0, "op_exact": 2.0, "op_top64": 0.2}
    projected = bench.project(shape, times)
    assert set(projected) == {"exact", "top64"}
    assert projected["exact"]["seqd_step_s"] == pytest.approx(20.0)
    assert projected["exact"]["rcd_over_seqd"] == pytest.approx(20.0 / 22.0)
    assert projected["top64"]["rcd_over_seqd"] == pytest.approx(20.0 / 20.2)
    assert projected["top64"]["op_share"] == pytest.approx(0.2 / 20.2)


def test_fastest_interleaves_the_calls_and_keeps_the_minimum(bench, monkeypatch):
    order = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    best = bench.fastest({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2)
    assert order == ["a", "b"] * 3  # one warm-up round, then the repeats
    assert best == {"a": 1, "b": 1}


def test_a_small_run_writes_the_projection(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(bench.MODELS, "SDAR-8B", bench.ModelShape(
        vocab=300, hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2))
    out = tmp_path / "projection.json"
    assert bench.main(["--models", "SDAR-8B", "--rows", "4", "--top-k", "8", "--repeats", "1",
                       "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    (record,) = summary["results"]
    assert (record["model"], record["rows"]) == ("SDAR-8B", 4)
    assert set(record["projected"]) == {"exact", "top8"}
    for values in record["projected"].values():
        assert 0.0 < values["rcd_over_seqd"] < 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(summary["load_average_1_5_15_before"]) == 3


def test_bad_arguments_are_refused_before_any_work(bench, capsys):
    assert bench.main(["--rows", "0"]) == 2
    assert "--rows" in capsys.readouterr().err


def test_no_exact_times_only_the_top_k_settings(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(bench.MODELS, "LLaDA-8B", bench.ModelShape(
        vocab=200, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=2))
    out = tmp_path / "projection.json"
    assert bench.main(["--models", "LLaDA-8B", "--rows", "3", "--top-k", "4", "16",
                       "--repeats", "1", "--no-exact", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["results"]
    assert set(record["seconds"]) == {"layer", "head", "op_top4", "op_top16"}
    assert set(record["projected"]) == {"top4", "top16"}
