"""Training the demo model logs its progress: a first start on a slow machine trains for minutes."""

from __future__ import annotations

import logging
import re

from data_plane.demo import TASKS, TrainingProgress, write_demo_model


def test_training_the_demo_model_logs_a_line_at_each_tenth_of_its_steps(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="data_plane.demo"):
        write_demo_model(tmp_path, base_steps=20, adapter_steps=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo model training:")]
    assert len(lines) == 10
    assert re.fullmatch(r"demo model training: 10% \(base model, step 5/20\), \d+ s", lines[0])
    assert f"adapter {TASKS[-1]}, step 10/10" in lines[-1] and "100%" in lines[-1]
    assert any("adapter" in line for line in lines[:-1])


def test_progress_lines_stay_ten_whatever_the_number_of_steps(caplog):
    for total_steps in (3, 7, 2000):
        caplog.clear()
        progress = TrainingProgress(total_steps)
        with caplog.at_level(logging.INFO, logger="data_plane.demo"):
            for step in range(1, total_steps + 1):
                progress.step("base model", step, total_steps)
        shares = [int(re.search(r"(\d+)%", r.getMessage()).group(1)) for r in caplog.records]
        assert shares[-1] == 100 and shares == sorted(shares)
        assert len(shares) == min(total_steps, 10)
