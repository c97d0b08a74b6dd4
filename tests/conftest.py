from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from fga_search import search

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the tests' decoded-dataset and model caches out of the user's cache folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared() -> Path:
    assert (SHARED / "models" / "resnet56_cifar10.pt").is_file(), f"shared material missing at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def cifar_dir(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared JPEG CIFAR-10, extracted once per session (train/ and test/ ImageFolder trees)."""
    out = tmp_path_factory.mktemp("cifar10")
    # the system's tar: 3x faster than tarfile on these 60,000 small files (the archive is ours)
    subprocess.run(["tar", "xzf", str(shared / "data" / "cifar10-jpeg.tar.gz"), "-C", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def cifar(cifar_dir: Path):  # type: ignore[no-untyped-def]
    from fga_search import load_dataset

    return load_dataset("imagefolder", data_dir=str(cifar_dir), seed=0)


@pytest.fixture(scope="session")
def resnet56(shared: Path):  # type: ignore[no-untyped-def]
    from fga_search import build_model

    return build_model("resnet56", num_classes=10, weights=shared / "models" / "resnet56_cifar10.pt")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real quickstart run (digits CNN), small: 8 trials of 1 epoch, once per session, shared by
    the export and report tests. They read it (a test that changes a run copies it first); the
    report tests rewrite its report.html and report.md, as the search wrote them."""
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("runs") / "quick"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        search(out=str(out), budget=0.2, trials=8, epochs=1, quiet=True)
    return out
