"""transfer.py on the demo data: frozen stages stay put, unfrozen ones learn, sweeps, clear errors."""
import csv
import shutil

import pytest
import torch

from conftest import run_main, run_script
from lib.checkpoint import FORMAT, file_hash, load_checkpoint, save_checkpoint
from lib.data import Split, load_split
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES
from lib.errors import UserError
from lib.models import build_model
from lib.engine import check_splits
from lib.transfer import load_source, resolve_freeze


def _resnet_source(path):
    """A resnet18 "source" checkpoint with distinctive BatchNorm statistics and mean/std.

    Training one on the demo source task would cost more than the whole test; what matters
    here is what transfer does with the weights, not how good they are.
    """
    torch.manual_seed(0)
    model = build_model("resnet18", len(SOURCE_CLASSES), 64)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(123)
    checkpoint = {"format": FORMAT, "model": "resnet18", "task": "source", "classes": SOURCE_CLASSES,
                  "image_size": 64, "mean": [0.3, 0.4, 0.5], "std": [0.21, 0.22, 0.23], "args": {},
                  "epoch": 1, "metrics": {}, "state_dict": model.state_dict()}
    save_checkpoint(checkpoint, path)
    return checkpoint


def test_frozen_stages_and_their_batchnorm_stats_do_not_move(demo_data, tmp_path):
    source = _resnet_source(tmp_path / "source.pt")
    out = tmp_path / "target"
    run_script("transfer.py", "--source", tmp_path / "source.pt", "--data", demo_data, "--task", "target",
               "--freeze", "2", "--epochs", "1", "--batch-size", "32", "--lr", "1e-2",
               "--lr-backbone", "1e-3", "--out", out)
    target = load_checkpoint(out / "last.pt")
    before, after = source["state_dict"], target["state_dict"]
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    trained = [k for k in before if k.startswith(("layer2.", "layer3.", "layer4."))]
    assert any("running_mean" in k for k in frozen) and any("running_var" in k for k in trained)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    for kind in ("conv1.weight", "bn1.weight", "running_mean", "running_var", "num_batches_tracked"):
        keys = [k for k in trained if k.endswith(kind)]
        assert keys and all(not torch.equal(before[k], after[k]) for k in keys), f"unfrozen {kind} did not move"
    assert after["fc.weight"].shape[0] == len(TARGET_CLASSES)
    # Preprocessing travels with the weights; the lineage names the source.
    assert (target["mean"], target["std"], target["image_size"]) == (source["mean"], source["std"], 64)
    assert target["classes"] == TARGET_CLASSES and target["model"] == "resnet18"
    assert target["lineage"]["source_sha256"] == file_hash(tmp_path / "source.pt")
    assert target["lineage"]["frozen_stages"] == 2 and target["lineage"]["source"].endswith("source.pt")
    groups = target["training"]["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-2], "--lr-backbone for the backbone, --lr for the head"


def test_freeze_sweep_writes_table_and_plot(demo_data, source_run, tmp_path):
    out = tmp_path / "sweep"
    result = run_script("transfer.py", "--source", source_run / "best.pt", "--data", demo_data,
                        "--task", "target", "--freeze", "0", "all", "--epochs", "2", "--out", out)
    assert "trainable" in result.stdout
    assert (out / "sweep.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["frozen_stages"] for r in rows] == ["0", "all"]
    source = load_checkpoint(source_run / "best.pt")["state_dict"]
    head = 8 * 2 * 2 * len(TARGET_CLASSES) + len(TARGET_CLASSES)
    total = sum(v.numel() for k, v in source.items() if not k.startswith("fc.")) + head
    assert [int(r["trainable_params"]) for r in rows] == [total, head]
    for row in rows:
        run = out / f"freeze-{row['frozen_stages']}"
        best = load_checkpoint(run / "best.pt")
        assert abs(best["metrics"]["val_auroc"] - float(row["best_val_auroc"])) < 1e-12
        assert int(row["epochs"]) == 2 and (run / "curves.png").is_file()
    probe = load_checkpoint(out / "freeze-all" / "last.pt")
    assert probe["lineage"]["frozen_stages"] == 3
    assert all(torch.equal(source[k], probe["state_dict"][k]) for k in source if not k.startswith("fc."))
    refused = run_main("transfer.py", "--source", source_run / "best.pt", "--data", demo_data,
                       "--task", "target", "--freeze", "0", "all", "--out", out, check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    # --resume continues a sweep: freeze-0 from its last.pt (finished: nothing more to train),
    # freeze-all (removed here, as if it had never started) from scratch; the table is
    # rewritten from both. More epochs would move the learning-rate schedule: refused.
    earlier = load_checkpoint(out / "freeze-0" / "last.pt")["history"]
    shutil.rmtree(out / "freeze-all")
    longer = run_main("transfer.py", "--source", source_run / "best.pt", "--data", demo_data, "--task", "target",
                      "--freeze", "0", "all", "--epochs", "3", "--out", out, "--resume", check=False)
    assert longer.returncode == 2 and "different --epochs (it had --epochs 2)" in longer.stderr
    resumed = run_script("transfer.py", "--source", source_run / "best.pt", "--data", demo_data,
                         "--task", "target", "--freeze", "0", "all", "--epochs", "2", "--out", out, "--resume")
    assert resumed.stdout.count("resuming") == 1 and "freeze-0" in resumed.stdout
    assert load_checkpoint(out / "freeze-0" / "last.pt")["history"] == earlier
    assert [r["epoch"] for r in load_checkpoint(out / "freeze-all" / "last.pt")["history"]] == [1, 2]
    assert [int(r["epochs"]) for r in csv.DictReader(open(out / "sweep.csv"))] == [2, 2]


def test_too_many_frozen_stages_is_a_one_line_error(demo_data, source_run, tmp_path):
    result = run_main("transfer.py", "--source", source_run / "best.pt", "--data", demo_data, "--task", "target",
                      "--freeze", "4", "--out", tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "transfer.py: error: --freeze 4: cnn3 has 3 stages; choose from 0, 1, 2, 3, all"


def test_bad_source_or_target_data_is_a_clear_error(demo_data, source_run, tmp_path):
    with pytest.raises(UserError, match="metrics.csv: not a readable checkpoint"):
        load_source(source_run / "metrics.csv")
    mislabelled = load_checkpoint(source_run / "best.pt")
    mislabelled["model"] = "resnet18"
    save_checkpoint(mislabelled, tmp_path / "mislabelled.pt")
    with pytest.raises(UserError, match="mislabelled.pt: weights do not fit model 'resnet18'"):
        load_source(tmp_path / "mislabelled.pt")
    mislabelled["model"] = "lenet5"
    save_checkpoint(mislabelled, tmp_path / "unknown.pt")
    with pytest.raises(UserError, match="unknown.pt: model 'lenet5' is not one this project builds"):
        load_source(tmp_path / "unknown.pt")
    with pytest.raises(UserError, match="--freeze: all repeats"):
        resolve_freeze(["3", "all"], "cnn3")
    val = load_split(demo_data, "val", "target")
    only_first_class = Split(val.images[:30], val.labels[:30], val.classes, val.filenames[:30])
    assert set(only_first_class.labels.tolist()) == {0}
    with pytest.raises(UserError, match=f"train split has no images of class.*{TARGET_CLASSES[1]}"):
        check_splits(only_first_class, val)
    with pytest.raises(UserError, match="val split needs .* at least two classes"):
        check_splits(val, only_first_class)
