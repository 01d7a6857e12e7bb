"""Self-describing checkpoints (lib.checkpoint): what a checkpoint records, and what --resume
compares (every flag that shapes training, normalisation, the image set, the data under the run)."""
import pytest
import torch

from conftest import run_main
from lib.checkpoint import load_checkpoint, resume_mismatches
from lib.demo import SOURCE_CLASSES


def test_checkpoint_describes_itself(source_run):
    checkpoint = torch.load(source_run / "best.pt", weights_only=True)
    assert checkpoint["model"] == "cnn3"
    assert checkpoint["classes"] == SOURCE_CLASSES
    assert checkpoint["image_size"] == 64
    assert len(checkpoint["mean"]) == 3 and all(0 < s < 1 for s in checkpoint["std"])
    assert checkpoint["args"]["task"] == "source"
    assert {"val_accuracy", "val_auroc", "val_loss"} <= set(checkpoint["metrics"])
    assert load_checkpoint(source_run / "last.pt")["epoch"] == 3


def test_resume_compares_every_flag_that_shapes_training():
    """Every flag of train.py, transfer.py and crossval.py is compared on --resume unless it is
    one of the few named free; so a flag added later is compared without being listed."""
    import crossval
    import train
    import transfer
    from lib.checkpoint import FREE_ON_RESUME
    for script in (train, transfer, crossval):
        parser = script.get_args_parser()
        args = {action.dest: action.default for action in parser._actions if action.dest != "help"}
        run = {"model": "cnn3", "classes": ["a", "b"], "args": args}
        for key in args:
            if key in FREE_ON_RESUME or key in ("data", "source", "freeze", "weights", "model", "stem",
                                                "image_size", "resize", "task"):  # compared as resolved
                continue
            changed = {**run, "args": {**args, key: "another value"}}
            assert resume_mismatches(run, changed) == ["--" + key.replace("_", "-")], (script.__name__, key)
    # The free ones really are few, and none of them says what the network learns from.
    assert {"mean", "std", "max_image_pixels", "skip_bad_images", "lr", "epochs", "folds"}.isdisjoint(FREE_ON_RESUME)


@pytest.mark.parametrize("changed, had", [
    (["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"], "no --mean, no --std"),
    (["--max-image-pixels", "0"], "--max-image-pixels 89478485"),
    (["--skip-bad-images"], "no --skip-bad-images"),
])
def test_resume_refuses_other_normalisation_or_image_set(demo_data, tmp_path, changed, had):
    # One epoch of a 2-epoch run is enough; --epochs differs too, so the line names both.
    out = tmp_path / "run"
    common = ["--data", demo_data, "--task", "target", "--model", "cnn3", "--out", out]
    run_main("train.py", *common, "--epochs", "1")
    before = (out / "last.pt").read_bytes()
    result = run_main("train.py", *common, "--epochs", "2", "--resume", *changed, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    flags = [word for word in changed if word.startswith("--")]
    assert f"belongs to a run with different {', '.join(flags + ['--epochs'])} (it had {had}, --epochs 1)" \
        in result.stderr, result.stderr
    assert (out / "last.pt").read_bytes() == before


def test_resume_says_when_the_data_changed_under_the_run():
    # Same flags, same folder, same classes, but the training split's statistics moved: its files changed.
    run = {"model": "cnn3", "classes": ["a", "b"], "mean": [0.4] * 3, "std": [0.2] * 3, "args": {"data": "demo"}}
    assert resume_mismatches(run, {**run, "mean": [0.41] * 3}) == ["--data"]
    assert resume_mismatches(run, dict(run)) == []
