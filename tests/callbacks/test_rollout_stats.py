"""Validation counts reach validation.jsonl, and the learning curve tests the final validation against a baseline."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pi0_lightning.callbacks import RolloutStatsWriter
from pi0_lightning.learning_curve import main as learning_curve


def _validation(iterations: int, successes: list[int], episodes: int = 50) -> dict:
    settings = [
        {"metric": f"val/success_rate{'' if i == 0 else f'_w{w:g}'}", "value": w, "success_rate": s / episodes,
         "episodes": episodes, "successes": s, "per_task": {"2": {"episodes": episodes, "successes": s}}}
        for i, (w, s) in enumerate(zip((1.0, 2.0), successes, strict=True))
    ]  # fmt: skip
    return {"iterations_trained": iterations, "settings": settings}


def test_validation_results_are_appended_once_and_skipped_in_sanity_checks(tmp_path, capsys):
    writer = RolloutStatsWriter()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, sanity_checking=False)
    writer.setup(trainer, None, "validate")
    module = SimpleNamespace(validation_results=_validation(3, [20, 25]))
    writer.on_validation_start(trainer, module)
    writer.on_validation_end(trainer, module)
    writer.on_validation_end(trainer, module)  # nothing new since: nothing written
    module.validation_results = _validation(4, [1, 1])
    writer.on_validation_end(SimpleNamespace(**{**vars(trainer), "sanity_checking": True}), module)
    lines = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["seconds"] >= 0
    assert {k: v for k, v in lines[0].items() if k != "seconds"} == _validation(3, [20, 25])
    assert (
        "[validation after 3 iterations] val/success_rate 20/50, val/success_rate_w2 25/50" in capsys.readouterr().out
    )


def test_learning_curve_compares_the_final_validation_with_the_baseline(tmp_path, capsys):
    run, before = tmp_path / "run", tmp_path / "before"
    run.mkdir(), before.mkdir()
    stats = [{"iteration": i, "rollout/episodes": 16, "rollout/success_rate": r, "rollout/useful_group_frac": 1.0,
              "rollout/train_chunks": 100} for i, r in enumerate([0.25, 0.5, 0.75])]  # fmt: skip
    (run / "rollout_stats.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stats))
    (run / "validation.jsonl").write_text(json.dumps(_validation(3, [30, 35])) + "\n")
    (before / "validation.jsonl").write_text(json.dumps(_validation(0, [10, 10])) + "\n")
    assert learning_curve([str(run), "--before", str(before)]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 0.600 (30/50) | 0.700 (35/50) |" in out
    assert "before (" in out and "0.200 (n=50)" in out
    # 10/50 -> 30/50: z = 4.08; 10/50 -> 35/50: z = 5.03
    assert "val/success_rate: 0.600 (n=50); z = 4.08" in out and "val/success_rate_w2: 0.700 (n=50); z = 5.03" in out


def test_learning_curve_without_a_baseline_validation_is_one_line_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rollout_stats.jsonl").write_text(
        json.dumps(
            {
                "iteration": 0,
                "rollout/episodes": 8,
                "rollout/success_rate": 0.5,
                "rollout/useful_group_frac": 1.0,
                "rollout/train_chunks": 10,
            }
        )
        + "\n"  # fmt: skip
    )
    (run / "validation.jsonl").write_text(json.dumps(_validation(1, [5, 5])) + "\n")
    assert learning_curve([str(run), "--before", str(tmp_path / "missing")]) == 2
    assert "no validation.jsonl entries" in capsys.readouterr().err


def test_timing_splits_an_iteration_and_the_learning_curve_tables_it(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 104.0, 110.0, 112.0])  # epoch 0 starts, ends; epoch 1 starts, ends (wall clock)
    counter = iter([50.0, 51.5])  # validation inside epoch 1 starts, ends (perf counter)
    monkeypatch.setattr("pi0_lightning.callbacks.rollout_stats.time.time", lambda: next(clock))
    monkeypatch.setattr("pi0_lightning.callbacks.rollout_stats.time.perf_counter", lambda: next(counter))
    writer = RolloutStatsWriter()
    metrics = {
        "rollout/seconds": 3.0,
        "rollout/env_seconds": 1.0,
        "rollout/policy_seconds": 2.0,
        "rollout/success_rate": 0.5,
        "rollout/useful_group_frac": 1.0,
    }
    metrics |= {"rollout/train_chunks": 10, "rollout/env_steps_per_s": 100.0, "rollout/policy_ms_per_call": 5.0}
    datamodule = SimpleNamespace(iteration=SimpleNamespace(metrics=metrics))
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True, sanity_checking=False)
    trainer.current_epoch, trainer.datamodule = 0, datamodule
    writer.setup(trainer, None, "fit")
    module = SimpleNamespace(validation_results=None)
    writer.on_train_epoch_start(trainer, module)
    writer.on_train_epoch_end(trainer, module)
    trainer.current_epoch = 1
    writer.on_train_epoch_start(trainer, module)
    writer.on_validation_start(trainer, module)
    module.validation_results = _validation(2, [5, 6])
    writer.on_validation_end(trainer, module)
    writer.on_train_epoch_end(trainer, module)
    rows = [json.loads(x) for x in (tmp_path / "timing.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["train_seconds"], r["validation_seconds"]) for r in rows] == [
        (0, 4.0, 0.0),
        (1, 0.5, 1.5),
    ]
    assert learning_curve([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # iteration 1 started 6 s after iteration 0 ended, 3 s of which were its rollout
    # no reset time reported by this (fake) env: "-"
    assert (
        "| 0 | 3.0 | 1.0 | 2.0 | - | 4.0 | 0.0 | - | - |" in out
        and "| 1 | 3.0 | 1.0 | 2.0 | - | 0.5 | 1.5 | 3.0 | - |" in out
    )
