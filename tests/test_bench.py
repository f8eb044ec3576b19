"""`bitcompile bench` on a tiny model: both engines run and the report carries what tools read."""

import json

from bitcompile.cli import main
from bitcompile.model.config import load_config
from bitcompile.tools.bench import kv_bytes_per_token
from bitcompile.tools.timing import measure_bandwidth


def test_bench_reports_both_engines(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    main(["bench", str(checkpoints["autobitlinear"]), "--threads", "1", "--prompt", "16", "--gen", "8", "--repeat", "1",
          "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["bandwidth_gbps"] > 1
    assert {r["engine"] for r in report["runs"]} == {"bitcompile", "onnxruntime"}
    cfg = load_config(checkpoints["autobitlinear"])
    for r in report["runs"]:
        assert r["threads"] == 1
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "bytes_per_token", "gbps"):
            assert r[key] > 0, key
        assert r["bytes_per_token"] > kv_bytes_per_token(cfg, 16)  # weights on top of the KV cache
        assert abs(r["floor_fraction"] - r["gbps"] / report["bandwidth_by_threads"]["1"]) < 1e-9
    kernels = report["kernels"]  # the tiny model's 4 decode GEMVs alone, then their sum
    assert [k["kernel"] for k in kernels[:4]] == [f"ternary_matmul decode {n}x{k}"
                                                  for n, k in ((cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size),
                                                               (cfg.hidden_size, cfg.q_size),
                                                               (2 * cfg.intermediate_size, cfg.hidden_size),
                                                               (cfg.hidden_size, cfg.intermediate_size))]
    assert kernels[4]["weight_bytes"] == sum(k["weight_bytes"] for k in kernels[:4])
    for k in kernels:
        assert k["us"] > 0 and abs(k["gbps"] - k["weight_bytes"] / k["us"] / 1e3) < 1e-9
        assert 0 < k["floor_fraction"] < 100
    table = capsys.readouterr().out
    assert "decode tok/s" in table and "x ONNX Runtime" in table and "decode GEMV kernels alone" in table


def test_bandwidth_measure_is_plausible():
    assert 1 < measure_bandwidth(1, repeats=1) < 1000


def test_bench_concurrency_reports_what_tools_read(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    main(["bench", str(checkpoints["autobitlinear"]), "--threads", "1", "--prompt", "16", "--gen", "12", "--repeat",
          "1", "--baseline", "none", "--concurrency", "1,3", "--http", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["concurrency"]
    assert [(r["n"], r["mode"]) for r in rows] == [(1, "burst"), (3, "burst"), (3, "staggered")]
    for r in rows:
        for key in ("aggregate_decode_tok_s", "prefill_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
                    "peak_rss_mb"):
            assert r[key] > 0, key
        assert r["ttft_p50_s"] <= r["ttft_p99_s"] and r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["prefix_hits"] == 0  # every request has its own prompt
    assert len({r["prefill_tok_s"] for r in rows}) == 1  # the single-sequence rate of this run, in every row
    assert [r["n"] for r in report["http"]] == [1, 3]  # the same requests through `bitcompile serve`
    for r in report["http"]:
        assert r["throughput_tok_s"] > 0 and r["ttft_p50_s"] > 0 and r["peak_rss_mb"] > 0
    table = capsys.readouterr().out
    assert "concurrent requests" in table and "through the HTTP server" in table


def test_concurrency_rounds_report_each_figure_s_median():
    """--repeat rounds of the concurrency rows (each run its own process): per row the median of every
    figure, the largest peak RSS, counts stay integers, and every run's decode rate is kept."""
    from bitcompile.tools.bench_concurrency import _median_row

    runs = [{"n": 8, "mode": "burst", "aggregate_decode_tok_s": rate, "itl_p50_s": itl, "peak_rss_mb": rss,
             "prefix_hits": hits} for rate, itl, rss, hits in [(120.0, 0.066, 1300.0, 0), (130.0, 0.061, 1320.0, 2),
                                                               (90.0, 0.09, 1310.0, 1)]]
    row = _median_row(tuple(runs))
    assert (row["n"], row["mode"], row["aggregate_decode_tok_s"], row["itl_p50_s"]) == (8, "burst", 120.0, 0.066)
    assert row["peak_rss_mb"] == 1320.0 and row["prefix_hits"] == 1 and isinstance(row["prefix_hits"], int)
    assert row["aggregate_decode_runs"] == [120.0, 130.0, 90.0]


def test_bench_refuses_bad_concurrency(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "--concurrency", "4,x"])
    assert "--concurrency '4,x': give comma-separated positive integers" in capsys.readouterr().err


def test_prefill_rate_is_the_median_of_warm_prefills():
    """The concurrency rows' yardstick: the first (allocating) prefill is not timed, and one slow
    run among the timed ones does not set the rate."""
    import time

    from bitcompile.tools.bench_concurrency import prefill_rate

    class Engine:
        def __init__(self, seconds):
            self.seconds, self.calls, self.released = list(seconds), 0, 0

        def prefill(self, ids):
            time.sleep(self.seconds[self.calls])
            self.calls += 1

        def release(self):
            self.released += 1

    engine = Engine([0.3, 0.02, 0.2, 0.02])  # a cold first call, then one slow run of three
    rate = prefill_rate(engine, list(range(100)))
    assert engine.calls == engine.released == 4
    assert 100 / 0.025 < rate <= 100 / 0.02  # the median (a mean would be 3500)
