"""python -m deepcomm.ray_launch: ranks as Ray actors, numbered host after host, with torchrun's environment."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from deepcomm.ray_launch import Placement, exit_code, parse_args, rank_environments, rank_order

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


def test_ranks_are_numbered_host_after_host_and_by_gpu_within_a_host():
    # Ray may hand actors out interleaved across hosts and GPUs in any order.
    placements = [Placement("10.0.0.2", (3,)), Placement("10.0.0.1", (1,)), Placement("10.0.0.2", (0,)),
                  Placement("10.0.0.1", (0,))]
    assert rank_order(placements) == [2, 0, 3, 1]  # host 10.0.0.2 first seen: its GPU 0, then GPU 3
    envs = rank_environments(placements, 29500)
    by_rank = sorted(envs, key=lambda e: int(e["RANK"]))
    assert [(e["GROUP_RANK"], e["LOCAL_RANK"]) for e in by_rank] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for env in envs:
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "10.0.0.2" and env["MASTER_PORT"] == "29500"
    # Every actor of a host sees that host's GPUs in local-rank order: local rank i's is the i-th, its own.
    for actor, env in enumerate(envs):
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert int(visible[int(env["LOCAL_RANK"])]) == placements[actor].gpus[0]
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == "0,3" and envs[1]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_cpu_ranks_see_no_gpu():
    envs = rank_environments([Placement("h", ()), Placement("h", ())], 1234)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["", ""]
    assert [e["RANK"] for e in envs] == ["0", "1"]


@pytest.mark.parametrize("placements, port, message", [([], 1, "^placements:"), ([Placement("h", ())], 0, "^master_port:")])
def test_bad_placements_are_refused_by_name(placements, port, message):
    with pytest.raises(ValueError, match=message):
        rank_environments(placements, port)


def test_the_target_and_everything_after_it_are_the_targets(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("")
    args = parse_args(["--nproc", "2", "--gpus-per-rank=0", str(script), "--nproc", "7", "-m", "x"])
    assert (args.nproc, args.gpus_per_rank, args.module) == (2, 0, None)
    assert args.path == str(script) and args.argv == ["--nproc", "7", "-m", "x"]
    args = parse_args(["--nproc", "3", "-m", "deepcomm.bench", "--preset", "prefill"])
    assert args.module == "deepcomm.bench" and args.argv == ["--preset", "prefill"] and args.path is None


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "-m", "m"], "--nproc: must be >= 1"),
    (["--nproc", "2"], "target: a script to run, or -m MODULE"),
    (["--nproc", "2", "-m"], "-m: expected a module name"),
    (["--nproc", "2", "no_such_script.py"], "target: no script at no_such_script.py"),
    (["--nproc", "2", "--cpus-per-rank", "0", "-m", "m"], "--cpus-per-rank: must be > 0"),
    (["--nproc", "2", "--gpus-per-rank", "2", "-m", "m"], "--gpus-per-rank"),
])
def test_bad_launcher_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_scripts_exit_means_what_the_interpreter_would_exit_with():
    assert [exit_code(SystemExit(c)) for c in (None, 0, 3, "failed")] == [0, 0, 3, 1]


def _launch(tmp_path, *argv, timeout=240):
    command = [sys.executable, "-m", "deepcomm.ray_launch", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=timeout)


@needs_ray
def test_the_benchmark_runs_on_ray_actors_and_checks_itself(tmp_path):
    """The main job under Ray: three CPU ranks run the reference path over gloo, checked as under torchrun."""
    rows_path = tmp_path / "rows.json"
    out = _launch(tmp_path, "--nproc", "3", "--gpus-per-rank", "0", "-m", "deepcomm.bench", "--device", "cpu",
                  "--tokens", "32", "--hidden", "128", "--experts", "12", "--topk", "4", "--iters", "2",
                  "--warmup", "1", "--dtypes", "bf16", "--json", str(rows_path))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    rows = json.loads(rows_path.read_text())
    assert [(r["stage"], r["dtype"]) for r in rows] == [("layout", "-"), ("dispatch", "bf16"), ("combine", "bf16")]
    assert all(r["check"] == "ok" and r["ranks"] == 3 and r["path"] == "reference" for r in rows)


@needs_ray
def test_each_actor_gets_torchruns_environment_and_a_failing_rank_is_named(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES"]
        seen = {{k: os.environ.get(k) for k in keys}}
        seen["argv"] = sys.argv[1:]
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
            json.dump(seen, f)
        sys.exit(3 if os.environ["RANK"] == "1" else 0)
    """))
    out = _launch(tmp_path, "--nproc", "3", "--gpus-per-rank", "0", str(script), "--flag", "value")
    assert out.returncode == 3, (out.stdout + out.stderr)[-4000:]
    assert "rank 1 exited with status 3" in out.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"] and {s["WORLD_SIZE"] for s in seen} == {"3"}
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"] and {s["LOCAL_WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["GROUP_RANK"] for s in seen} == {"0"} and len({(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen}) == 1
    assert all(s["CUDA_VISIBLE_DEVICES"] == "" and s["argv"] == ["--flag", "value"] for s in seen)
