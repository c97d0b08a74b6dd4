"""Where the validation images come from (issue 28): a val/ folder, --val-dir, part of the test
split on request, or the training split (with a warning, since the trained model learned them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fga_search import load_dataset
from fga_search.data._data import TRAIN_VALIDATION_WARNING


def _tree(root: Path, splits: dict[str, int], classes: int = 3, size: int = 8, seed: int = 0) -> Path:
    """An ImageFolder: split name -> images per class; every image differs from every other."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    return root


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in images}


def test_a_val_folder_beside_train_and_test_is_the_validation_split(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", {"train": 10, "val": 4, "test": 6})
    data = load_dataset("imagefolder", data_dir=str(root))
    assert data.val_source == "val/" and data.describe()["val_source"] == "val/"
    assert (len(data.train), len(data.val), len(data.test)) == (30, 12, 18)  # no training image held out
    val_file = np.asarray(Image.open(root / "val" / "class2" / "3.png")).transpose(2, 0, 1)
    assert bytes(val_file.tobytes()) in _rows(data.val.images)
    assert not _rows(data.val.images) & (_rows(data.train.images) | _rows(data.test.images))
    # a final fine-tune may use the user's validation images, never test images
    assert len(data.final_training_split()) == 42
    # asked for, the training split serves instead (the val/ folder is then unused)
    forced = load_dataset("imagefolder", data_dir=str(root), val_from="train", val_fraction=0.2)
    assert forced.val_source == "train" and (len(forced.train), len(forced.val)) == (24, 6)


def test_val_dir_and_val_from_test(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", {"train": 10, "test": 10})
    other = _tree(tmp_path / "v", {"held": 5}, seed=1) / "held"
    data = load_dataset("imagefolder", data_dir=str(root), val_dir=str(other))
    assert data.val_source == "val-dir" and (len(data.train), len(data.val), len(data.test)) == (30, 15, 30)

    whole = load_dataset("imagefolder", data_dir=str(root))
    assert whole.val_source == "train" and len(whole.train) == 27 and len(whole.test) == 30
    part = load_dataset("imagefolder", data_dir=str(root), val_from="test", val_fraction=0.2)
    assert part.val_source == "test"
    assert (len(part.train), len(part.val), len(part.test)) == (30, 6, 24)
    assert torch.bincount(part.val.labels).tolist() == [2, 2, 2]  # stratified
    # validation and the test figures come from disjoint parts of the test split, which they make up
    assert not _rows(part.val.images) & _rows(part.test.images)
    assert _rows(part.val.images) | _rows(part.test.images) == _rows(whole.test.images)
    assert len(part.final_training_split()) == 30  # never trains on test images
    # on a dataset without folders too
    digits = load_dataset("digits", val_from="test")
    assert digits.val_source == "test" and len(digits.val) + len(digits.test) == 359


def test_train_and_val_alone_keep_val_as_the_test_split(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", {"train": 10, "val": 4})
    data = load_dataset("imagefolder", data_dir=str(root))
    assert data.val_source == "train" and len(data.test) == 12 and len(data.train) + len(data.val) == 30
    assert "training split" in TRAIN_VALIDATION_WARNING and "--val-dir" in TRAIN_VALIDATION_WARNING


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty val/", r"d/val has no class folders"),
        (
            "val/ classes differ",
            r"d/val has other classes than the training images: missing \['class2'\], extra \['zebra'\]",
        ),
        (
            "val/ image size differs",
            r"d/val: images of shape \(3, 6, 6\) but the training images are \(3, 8, 8\); pass --image-size",
        ),
        ("val/ class without images", r"class folder .*d/val/class1 has no image files"),
        ("missing --val-dir", r"val dir not found: .*nowhere"),
        ("both", r"val_dir and val_from exclude each other"),
        ("bad val_from", r"val_from must be 'train' or 'test', got 'val'"),
    ],
)
def test_bad_validation_inputs_name_the_problem(tmp_path: Path, case: str, message: str) -> None:
    root = _tree(tmp_path / "d", {"train": 4, "test": 2})
    kwargs: dict[str, object] = {}
    if case == "empty val/":
        (root / "val").mkdir()
    elif case == "val/ classes differ":
        _tree(tmp_path / "x", {"val": 2})
        shutil.move(tmp_path / "x" / "val", root / "val")
        shutil.move(root / "val" / "class2", root / "val" / "zebra")
    elif case == "val/ image size differs":
        _tree(tmp_path / "x", {"val": 2}, size=6)
        shutil.move(tmp_path / "x" / "val", root / "val")
    elif case == "val/ class without images":
        _tree(tmp_path / "x", {"val": 2})
        shutil.move(tmp_path / "x" / "val", root / "val")
        for f in (root / "val" / "class1").iterdir():
            f.unlink()
    elif case == "missing --val-dir":
        kwargs["val_dir"] = str(tmp_path / "nowhere")
    elif case == "both":
        kwargs.update(val_dir=str(root / "test"), val_from="test")
    else:
        kwargs["val_from"] = "val"
    with pytest.raises(ValueError, match=message):
        load_dataset("imagefolder", data_dir=str(root), **kwargs)


# -- the command line ---------------------------------------------------------------------------

from test_hostile import call, refused  # noqa: E402  (the exit-2 rule, checked as everywhere else)

BASE = ["--model", "resnet20", "--dataset", "imagefolder", "--epochs", "0", "--trials", "2"]
BASE += ["--calibration", "8", "--recalibration", "8", "--front-latency-runs", "0"]
RUN = [*BASE, "--quiet"]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("empty val/", "/val has no class folders"),
        ("val/ classes differ", "/val has other classes than the training images"),
        ("both", "--val-dir and --val-from exclude each other"),
        ("bad --val-from", "argument --val-from: invalid choice: 'val'"),
        ("missing --val-dir", "val dir not found"),
    ],
)
def test_bad_validation_options_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needle: str
) -> None:
    root = _tree(tmp_path / "d", {"train": 4, "test": 2})
    extra: list[str] = []
    if case == "empty val/":
        (root / "val").mkdir()
    elif case == "val/ classes differ":
        _tree(tmp_path / "x", {"val": 2}, classes=2)
        shutil.move(tmp_path / "x" / "val", root / "val")
    elif case == "both":
        extra = ["--val-dir", str(root / "test"), "--val-from", "test"]
    elif case == "bad --val-from":
        extra = ["--val-from", "val"]
    else:
        extra = ["--val-dir", str(tmp_path / "nowhere")]
    refused([*RUN, "--data-dir", str(root), *extra, "--out", str(tmp_path / "run")], capsys, tmp_path, needle)


def test_a_search_validates_on_held_out_images_and_says_when_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fga_search import build_model

    root = _tree(tmp_path / "d", {"train": 8, "val": 3, "test": 4})
    code, _, err = call([*RUN, "--data-dir", str(root), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "a" / "run.json").read_text())["data"]
    assert (data["val_source"], data["train"], data["val"], data["test"]) == ("val/", 24, 9, 12)

    weights = tmp_path / "w.pt"
    torch.save(build_model("resnet20", num_classes=3).state_dict(), weights)
    plain = _tree(tmp_path / "p", {"train": 8, "test": 4})
    args = [*BASE, "--data-dir", str(plain), "--weights", str(weights)]  # not --quiet: the log
    code, _, err = call([*args, "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert err.count(TRAIN_VALIDATION_WARNING) == 1  # said once, with the way out
    report = (tmp_path / "b" / "report.md").read_text()
    assert report.count(TRAIN_VALIDATION_WARNING) == 1 and "a stratified part of the training split" in report
    code, _, err = call(
        [*args, "--val-from", "test", "--val-fraction", "0.25", "--out", str(tmp_path / "c")], capsys
    )
    assert code == 0 and TRAIN_VALIDATION_WARNING not in err, err
    data = json.loads((tmp_path / "c" / "run.json").read_text())["data"]
    assert (data["val_source"], data["val"], data["test"]) == ("test", 3, 9)
    report = (tmp_path / "c" / "report.md").read_text()
    assert TRAIN_VALIDATION_WARNING not in report and "part of the test split (--val-from test)" in report
    assert "the data's val/ folder (held out)" in (tmp_path / "a" / "report.md").read_text()


def test_data_seed_draws_the_validation_split_apart_from_the_search_seed(tmp_path: Path) -> None:
    """--data-seed: the held-out images and the --*-limit subsets follow it, not --seed."""
    from fga_search.engine._config import RunConfig
    from fga_search.engine._setup import prepare

    root = _tree(tmp_path / "d", {"train": 20, "test": 6})

    def data(**seeds: int) -> tuple[set[bytes], set[bytes]]:
        config = RunConfig(out=str(tmp_path / "r"), model="resnet20", dataset="imagefolder", data_dir=str(root),
                           train_limit=30, quiet=True, **seeds)  # type: ignore[arg-type]  # fmt: skip
        bundle = prepare(config, log=False, latency_floor_check=False, time_latency=False).data
        return _rows(bundle.val.images), _rows(bundle.train.images)

    default, moved, by_seed = data(seed=0), data(seed=0, data_seed=5), data(seed=5)
    assert moved == by_seed  # the data follow --data-seed ...
    assert moved[0] != default[0] and moved[1] != default[1]  # ... not the search's --seed
    assert len(moved[0]) == 6 and len(moved[1]) == 30  # 10 % of 60 held out; the subset of the rest
    assert data(seed=3, data_seed=0) == default
    from fga_search._cli import _config, _parser

    argv = [*RUN, "--data-dir", str(root), "--data-seed", "5", "--out", str(tmp_path / "a")]
    assert _config(_parser().parse_args(argv)).data_seed == 5  # on the command line (RunConfig's field)
