"""Distillation (--teacher): the teacher's probabilities are what the student learns, the checkpoint
records the teacher, refusals."""
import torch
import torch.nn.functional as F

from conftest import run_main
from lib.checkpoint import file_hash, load_checkpoint
from lib.distill import Teacher
from lib.inference import normalize


def test_targets_blend_the_label_with_the_teacher_at_its_own_size():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    teacher = Teacher(network, mean, std, image_size=16, weight=0.75, flops_per_image=1.0, entry={})
    images, labels = torch.rand(4, 3, 32, 32), F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    expected = 0.25 * labels + 0.75 * F.softmax(network(normalize(small, mean, std)), dim=1)
    targets = teacher.targets(images, labels)
    assert torch.allclose(targets, expected, atol=1e-6) and torch.allclose(targets.sum(1), torch.ones(4))


def inverted(path, out):
    """The checkpoint at `path` with its two outputs swapped under the same class names: a teacher
    that is confidently wrong, so a student that follows it, not the labels, ranks val backwards."""
    checkpoint = load_checkpoint(path)
    checkpoint["state_dict"] = {key: value.flip(0) if key.startswith("fc.") else value
                                for key, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, out)
    return out


def test_the_student_learns_the_teacher_not_the_labels(demo_data, tmp_path):
    run_main("train.py", "--data", demo_data, "--task", "source", "--epochs", "2", "--out", tmp_path / "source")
    common = ["--source", tmp_path / "source" / "model.pt", "--data", demo_data, "--task", "target", "--epochs", "4"]
    run_main("transfer.py", *common, "--out", tmp_path / "plain")
    teacher = inverted(tmp_path / "plain" / "model.pt", tmp_path / "inverted.pt")
    taught = run_main("transfer.py", *common, "--teacher", teacher, "--out", tmp_path / "taught")
    plain, student = (load_checkpoint(tmp_path / run / "model.pt") for run in ("plain", "taught"))
    assert plain["metrics"]["val_auroc"] > 0.7 and student["metrics"]["val_auroc"] < 0.3, \
        (plain["metrics"]["val_auroc"], student["metrics"]["val_auroc"])
    assert f"teacher: {teacher} (one model" in taught.stdout and "targets: its probabilities" in taught.stdout
    assert student["teacher"] == {"checkpoint": str(teacher.resolve()), "sha256": file_hash(teacher),
                                  "weight": 1.0, "model": "fastnet", "members": None, "image_size": 64}
    assert "teacher" not in plain
    # The teacher's forward passes are part of the run's compute.
    tflop = [load_checkpoint(tmp_path / run / "last.pt")["history"][-1]["total_tflop"] for run in ("plain", "taught")]
    assert tflop[1] > tflop[0]


def test_an_ensemble_teaches_train_py_and_a_resume_keeps_the_teacher(demo_data, tmp_path):
    common = ["--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "1"]
    for seed in (0, 1):
        run_main("train.py", *common, "--seed", str(seed), "--out", tmp_path / f"m{seed}")
    run_main("ensemble.py", tmp_path / "m0" / "model.pt", tmp_path / "m1" / "model.pt", "--out", tmp_path / "ens.pt")
    taught = run_main("train.py", *common, "--epochs", "2", "--teacher", tmp_path / "ens.pt",
                      "--teacher-weight", "0.5", "--out", tmp_path / "student")
    assert "(an ensemble of 2," in taught.stdout and "0.5 x the label + 0.5 x its probabilities" in taught.stdout
    assert load_checkpoint(tmp_path / "student" / "model.pt")["teacher"]["members"] == 2
    resumed = run_main("train.py", *common, "--epochs", "2", "--teacher", tmp_path / "ens.pt", "--resume",
                       "--out", tmp_path / "student", check=False)
    assert resumed.returncode == 2 and "--teacher-weight" in resumed.stderr, resumed.stderr


def test_a_teacher_of_other_classes_or_framing_or_in_crossval_is_refused(demo_data, source_run, target_run, tmp_path):
    other_classes = run_main("transfer.py", "--source", source_run / "model.pt", "--data", demo_data, "--task",
                             "target", "--epochs", "1", "--teacher", source_run / "model.pt",
                             "--out", tmp_path / "t", check=False)
    assert other_classes.returncode == 2
    assert other_classes.stderr.startswith(f"transfer.py: error: --teacher {source_run / 'model.pt'}: the classes differ"), \
        other_classes.stderr
    assert not (tmp_path / "t" / "model.pt").exists()
    cropped = load_checkpoint(target_run / "model.pt")
    torch.save({**cropped, "resize": "crop"}, tmp_path / "cropped.pt")
    other_framing = run_main("transfer.py", "--source", source_run / "model.pt", "--data", demo_data, "--task",
                             "target", "--epochs", "1", "--teacher", tmp_path / "cropped.pt",
                             "--out", tmp_path / "f", check=False)
    assert other_framing.returncode == 2 and "reads images with --resize crop, this run with squash" in \
        other_framing.stderr, other_framing.stderr
    crossval = run_main("crossval.py", "--source", source_run / "model.pt", "--data", demo_data, "--task", "target",
                        "--teacher", target_run / "model.pt", "--out", tmp_path / "cv", check=False)
    assert crossval.returncode == 2 and "cross-validation takes no teacher" in crossval.stderr
    weight = run_main("train.py", "--data", demo_data, "--task", "target", "--teacher", target_run / "model.pt",
                      "--teacher-weight", "1.5", "--out", tmp_path / "w", check=False)
    assert weight.returncode == 2 and "--teacher-weight" in weight.stderr
