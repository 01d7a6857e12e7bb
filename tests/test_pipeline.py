"""pipeline.sh's own logic: which scripts it runs with which flags, for each kind of data and
source, and its exit codes. A stand-in interpreter records each command (and lets export.py exit
as told), so the test costs no training; the scripts themselves are tested elsewhere."""
import os
import subprocess

import pytest

from conftest import REPO


@pytest.fixture
def pipeline(tmp_path):
    calls_log, fake_python = tmp_path / "calls.log", tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\necho "$(basename "$1") ${*:2}" >> "$CALLS"\n'
                           '[ "$(basename "$1")" != export.py ] || exit "${EXPORT_STATUS:-0}"\n')
    fake_python.chmod(0o755)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "landmarks.csv").write_text("filename,partition,task,semantic_label,numeric_label\n")
    (tmp_path / "photos" / "train").mkdir(parents=True)
    (tmp_path / "other" / "train").mkdir(parents=True)

    def run(*args, **env):
        calls_log.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(REPO / "pipeline.sh"), *map(str, args)], capture_output=True,
                                text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHON": str(fake_python), "CALLS": str(calls_log), **env})
        return result, calls_log.read_text().splitlines() if calls_log.exists() else []
    return run


def scripts(calls):
    return [call.split()[0] for call in calls]


def test_two_task_data_trains_the_source_then_transfers(pipeline):
    result, calls = pipeline("tasks", "OUT", SEED="3")
    assert result.returncode == 0, result.stderr
    assert scripts(calls) == ["train.py", "transfer.py", "evaluate.py", "explain.py", "export.py", "evaluate.py"]
    assert "--task source" in calls[0] and "--task target" in calls[1]
    assert "--source OUT/source/model.pt" in calls[1]
    assert all(("--seed 3" in c) == c.startswith(("train.py", "transfer.py", "export.py")) for c in calls), calls
    assert all("--checkpoint OUT/target/model.pt" in c for c in calls[2:5])
    assert "--checkpoint OUT/target/model.int8.onnx" in calls[-1] and "--task target" in calls[-1]


def test_one_task_data_trains_once_with_the_options_given(pipeline):
    result, calls = pipeline("photos", "OUT", "--model", "mobilenet_v3_small", "--weights", "DEFAULT",
                             "--image-size", "128", "--resize", "crop")
    assert result.returncode == 0, result.stderr
    assert scripts(calls) == ["train.py", "evaluate.py", "explain.py", "export.py", "evaluate.py"]
    assert "--model mobilenet_v3_small --weights DEFAULT --image-size 128 --resize crop" in calls[0]
    assert "--task" not in " ".join(calls) and "--out OUT/model" in calls[0]
    assert all("--checkpoint OUT/model/model.pt" in c for c in calls[1:4])


def test_a_source_checkpoint_or_source_data_is_transferred_from(pipeline):
    result, calls = pipeline("photos", "OUT", "--source", "runs/mine/model.pt")
    assert result.returncode == 0, result.stderr
    assert scripts(calls)[:2] == ["transfer.py", "evaluate.py"] and "--source runs/mine/model.pt" in calls[0]
    result, calls = pipeline("photos", "OUT", "--source-data", "other", "--model", "resnet18")
    assert result.returncode == 0, result.stderr
    assert scripts(calls)[:2] == ["train.py", "transfer.py"]
    assert "--data other" in calls[0] and "--model resnet18" in calls[0] and "--task" not in calls[0]
    assert "--data photos" in calls[1] and "--source OUT/source/model.pt" in calls[1]
    result, calls = pipeline("photos", "OUT", "--source-data", "tasks")
    assert "--task source" in calls[0] and "--task" not in calls[1], calls
    result, calls = pipeline("photos", "OUT", "--source-data", "other", "--source-data", "tasks")
    assert result.returncode == 0, result.stderr
    assert "--data other tasks --task source" in calls[0] and "--data photos" in calls[1], calls


def test_skip_bad_images_goes_to_every_step(pipeline):
    result, calls = pipeline("tasks", "OUT", "--skip-bad-images", "--model", "resnet18")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 6 and all("--skip-bad-images" in call for call in calls), calls
    result, calls = pipeline("photos", "OUT")
    assert not any("--skip-bad-images" in call for call in calls), calls


@pytest.mark.parametrize("args, message", [
    (["--source", "a.pt", "--source-data", "other"], "give --source or --source-data, not both"),
    (["--source", "a.pt", "--model", "resnet18"], "--model: a transfer takes"),
    (["--source", "a.pt", "--weights", "DEFAULT"], "--weights: a transfer takes the model, weights"),
    (["--epochs", "3"], "unknown option --epochs"),
    (["--model"], "--model needs a value"),
])
def test_a_bad_command_line_is_refused_before_any_step(pipeline, args, message):
    result, calls = pipeline("photos", "OUT", *args)
    assert result.returncode == 2 and calls == []
    assert result.stderr.startswith("usage: bash pipeline.sh") and f"pipeline.sh: error: {message}" in result.stderr


def test_int8_refused_finishes_with_3_and_a_failed_step_stops_with_its_code(pipeline):
    result, calls = pipeline("tasks", "OUT", EXPORT_STATUS="3")
    assert result.returncode == 3 and calls[-1].startswith("export.py") and "--seed 0" in calls[-1], calls
    assert "pipeline.sh: warning: no int8 model" in result.stderr and "done in" in result.stdout
    result, calls = pipeline("tasks", "OUT", EXPORT_STATUS="2")
    assert result.returncode == 2 and calls[-1].startswith("export.py") and "done in" not in result.stdout
