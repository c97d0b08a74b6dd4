from __future__ import annotations

import pytest
import torch
from torch import nn

from fga_search.data._data import Split
from fga_search.models._loader import Augment, DeviceSplit, Normalization
from fga_search.train._finetune import FinetuneConfig, FinetuneProgress, TeacherCache, finetune


def data(n: int = 96) -> DeviceSplit:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), generator=gen, dtype=torch.uint8)
    labels = (images.float().mean((1, 2, 3)) > 127).long()
    return DeviceSplit(
        Split(images, labels), device="cpu", normalization=Normalization((0.5,) * 3, (0.25,) * 3)
    )


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(108, 2))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.net(x)


def test_teacher_logits_are_computed_once_per_image_and_side() -> None:
    split = data()
    teacher = Counting()
    cache = TeacherCache(teacher, split, num_classes=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):  # six epochs with random flips
        for batch in split.batches(32, shuffle=True, augment=Augment(flip=True), generator=gen):
            logits = cache(batch)
            with torch.no_grad():
                expected = teacher.net(batch.x)
            torch.testing.assert_close(logits, expected)
    assert bool(cache.known.all())  # every image seen in both orientations
    assert all(size & (size - 1) == 0 for size in teacher.batch_sizes)  # padded to powers of two
    assert sum(teacher.batch_sizes) == cache.computed < 6 * len(split)  # far fewer than one pass per step


def test_finetune_fractional_epochs_and_distillation() -> None:
    split = data()
    torch.manual_seed(0)
    student, teacher = (
        nn.Sequential(nn.Flatten(), nn.Linear(108, 2)),
        nn.Sequential(nn.Flatten(), nn.Linear(108, 2)),
    )
    cache = TeacherCache(teacher, split, num_classes=2)
    stats = finetune(
        student, split, config=FinetuneConfig(epochs=0.5, batch_size=16, lr=0.05), teacher=cache, seed=0
    )
    assert stats.steps == 3 and stats.images == 48
    with torch.no_grad():
        x = split.take(torch.arange(len(split)))
        before = (student(x).softmax(1) - teacher(x).softmax(1)).abs().mean()
    finetune(
        student,
        split,
        config=FinetuneConfig(epochs=8, batch_size=16, lr=0.1, kd_alpha=1.0),
        teacher=cache,
        seed=1,
    )
    with torch.no_grad():
        after = (student(x).softmax(1) - teacher(x).softmax(1)).abs().mean()
    assert after < before  # the student moves towards the teacher
    assert finetune(student, split, config=FinetuneConfig(epochs=0.0), seed=0).steps == 0


@pytest.mark.parametrize(
    ("epochs", "batch", "expected"),
    [
        (2.5, 16, [(6, 1.0), (12, 2.0), (15, 2.5)]),  # 6 steps an epoch, then the last step
        (1.0, 32, [(3, 1.0)]),  # the last step is an epoch's end: reported once
        (0.75, 64, [(1, 64 / 96)]),  # under an epoch: the last step only
        (0.5, 64, [(1, 0.5)]),  # under a batch: one step of the 48 images asked, not of 64
    ],
)
def test_on_epoch_reports_each_epoch_and_the_last_step(
    epochs: float, batch: int, expected: list[tuple[int, float]]
) -> None:
    split = data()  # 96 images
    seen: list[FinetuneProgress] = []
    stats = finetune(
        nn.Sequential(nn.Flatten(), nn.Linear(108, 2)),
        split,
        config=FinetuneConfig(epochs=epochs, batch_size=batch),
        seed=0,
        on_epoch=seen.append,
    )
    assert [(p.step, p.epochs_done) for p in seen] == [(s, pytest.approx(e)) for s, e in expected]
    assert all(p.steps == stats.steps for p in seen)
    assert all(p.loss > 0 and p.seconds >= 0 for p in seen)
    assert seen[-1].loss == pytest.approx(stats.final_loss)


def test_non_finite_loss_raises() -> None:
    split = data()
    student = nn.Sequential(nn.Flatten(), nn.Linear(108, 2))
    with torch.no_grad():
        student[1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        finetune(student, split, config=FinetuneConfig(epochs=1, batch_size=16), seed=0)


def test_cached_teacher_refuses_random_crops() -> None:
    split = data()
    cache = TeacherCache(nn.Sequential(nn.Flatten(), nn.Linear(108, 2)), split, num_classes=2)
    with pytest.raises(ValueError, match="cached teacher logits need crop=False"):
        finetune(
            nn.Sequential(nn.Flatten(), nn.Linear(108, 2)),
            split,
            config=FinetuneConfig(crop=True),
            teacher=cache,
        )
