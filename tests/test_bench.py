"""The benchmark command: the training step's profile and the timing of two lanes in turns."""

import json

import pytest


def test_bench_profile_reports_per_step_counts(capsys, one_thread):
    from seglib.bench import main

    args = "--batch 1 --size 64 --k 4 --cluster-iters 2 --repeats 1 --warmup 1 --infer-size 64"
    assert main([*args.split(), "--profile", "--profile-steps", "1", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    prof = result["profile"]
    assert result["compile"] == "off" and prof["steps"] == 1
    assert 0 < prof["top_level_ops"] < prof["ops"] and prof["host_ms"] > 0 and prof["device_ms"] > 0


def test_bench_times_a_second_lane_in_turns(capsys, one_thread):
    from seglib.bench import main

    args = "--batch 1 --size 64 --k 4 --cluster-iters 2 --repeats 2 --warmup 1 --skip-infer --json --threads 1"
    assert main([*args.split(), "--lane", "fast", "--versus-lane", "learned"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lane"] == "fast" and result["versus_lane"] == "learned"
    ratio = result["train_step_s_versus"] / result["train_step_s"]
    assert result["lane_step_ratio"] == pytest.approx(ratio, abs=0.01) and ratio > 0
