"""TrainConfig: recipe defaults, typed errors, and the launcher plan."""
from __future__ import annotations

import os

import pytest

from data_contracts.errors import ConfigError, StageError
from pipeline_config.load import load_config
from tasks.train.launch import accelerate_command, cpu_threads_per_process, plan_launch


def test_defaults_are_the_seed_recipe():
    t = load_config({}).train
    assert (t.objective, t.shift, t.batch_size, t.grad_accum, t.epochs) == ("flow", 2.0, 12, 14, 20)
    assert (t.lr, t.warmup, t.optimizer, t.mixed_precision) == (2.5e-5, 0.05, "adamw8bit", "bf16")
    assert (t.caption_dropout, t.max_chunks, t.clip_skip, t.train_text_encoder) == (0.05, 3, 2, False)
    assert (t.sampling.shift, t.sampling.cfg_scale) == (3.0, 6.0)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.grad_acum'.*did you mean 'grad_accum'"):
        load_config({}, ["train.grad_acum=4"])
    with pytest.raises(ConfigError, match=r"train.objective"):
        load_config({}, ["train.objective=v_pred"])
    with pytest.raises(ConfigError, match=r"validation.sigmas must lie strictly between 0 and 1"):
        load_config({}, ["train.validation.sigmas=[0.0, 0.5]"])


def test_launch_plan():
    assert plan_launch("auto", None, "cpu") == ("inprocess", 1)
    assert plan_launch("auto", 2, "cpu") == ("accelerate", 2)
    assert plan_launch("accelerate", None, "cpu") == ("accelerate", 1)
    assert plan_launch("auto", None, "cpu", accelerate_config="multi-node.yaml")[0] == "accelerate"
    with pytest.raises(StageError, match="launcher=inprocess runs one process"):
        plan_launch("inprocess", 4, "cpu")
    cmd = accelerate_command("run.json", 2, port=29555)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "tasks.train.worker", "run.json"]
    threads = cmd[cmd.index("--num_cpu_threads_per_process") + 1]
    assert threads == str(cpu_threads_per_process(2))


def test_cpu_threads_per_process_shares_the_cores_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert [cpu_threads_per_process(n) for n in (1, 2, 8, 64)] == [32, 16, 4, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_process(2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert cpu_threads_per_process(4) == 8
    assert accelerate_command("run.json", 8, config_file="cluster.yaml")[3:5] == ["--config_file", "cluster.yaml"]


def test_train_node_needs_the_run_file_the_stage_logged(tmp_path, capsys):
    from flows.cli import main

    rc = main(["train-node", str(tmp_path / "run.json"), "--accelerate-config", str(tmp_path / "m1.yaml")])
    assert rc == 2 and "run.json does not exist" in capsys.readouterr().err
