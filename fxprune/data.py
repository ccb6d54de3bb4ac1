"""Datasets for ``fxprune train``.

``digits`` is scikit-learn's bundled copy of the UCI handwritten digits: 1,797 real 8x8
grey-scale images of the digits 0-9, so the default run needs no download. Each image is
scaled from its 0..16 grey levels to [0, 1], upsampled bilinearly to ``image_size`` and
replicated to 3 channels, so that any torchvision classification model takes it with only its
stem adapted to small images (see :mod:`fxprune.models`). The train/test split is a fixed
stratified 80/20 split drawn with ``split_seed``, independent of the training seed.

Any other value is the path of an image folder (``torchvision.datasets.ImageFolder`` layout:
one sub-folder per class). If it has ``train/`` and ``val/`` (or ``test/``) sub-folders those
are the splits; otherwise the same stratified 80/20 split is drawn. Every image is decoded once
when the folder is loaded, before training, so a damaged file is named then
(:class:`fxprune.errors.DatasetError`), not in the middle of an epoch.

Training order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import DatasetError

DIGITS = "digits"
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass
class Splits:
    """Train and test datasets of ``(image, label)`` pairs, and the number of classes."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int


def stratified_split(labels: Sequence[int], test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED):
    """Indices ``(train, test)`` of a stratified split with a fixed seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                   stratify=np.asarray(labels), shuffle=True)
    return np.sort(train).tolist(), np.sort(test).tolist()


def digits(image_size: int = 32) -> Splits:
    """scikit-learn's digits as ``float32 [N, 3, image_size, image_size]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size),
                                                 mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = stratified_split(bunch.target)
    return Splits(TensorDataset(images[train], labels[train]),
                  TensorDataset(images[test], labels[test]), num_classes=10, in_channels=3)


def image_folder(path: str, image_size: int) -> Splits:
    """An ImageFolder tree, resized to ``image_size`` squares, as tensors in [0, 1].

    Checked before any training: every split has at least two classes with images, and every
    image decodes (JPEGs at reduced resolution, which is enough to find a truncated or corrupt
    file); otherwise DatasetError names the folder or the file."""
    from torchvision import transforms

    # ImageFolder's default loader already converts every image to RGB.
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    test_dir = next((os.path.join(path, d) for d in ("val", "test")
                     if os.path.isdir(os.path.join(path, d))), None)
    train_dir = os.path.join(path, "train")
    if test_dir is not None and os.path.isdir(train_dir):
        train = _folder(train_dir, tf, image_size)
        test = _folder(test_dir, tf, image_size)
        if test.classes != train.classes:
            raise DatasetError(f"--dataset {path}: {test_dir} has classes {test.classes}, "
                               f"{train_dir} has {train.classes}")
        return Splits(train, test, num_classes=len(train.classes), in_channels=3)
    full = _folder(path, tf, image_size)
    try:
        tr, te = stratified_split(full.targets)
    except ValueError as e:  # a class with a single image cannot be split
        raise DatasetError(f"--dataset {path}: cannot split it into train and test sets ({e}); give "
                           f"each class at least two images, or train/ and val/ sub-folders") from None
    return Splits(Subset(full, tr), Subset(full, te), num_classes=len(full.classes),
                  in_channels=3)


def _folder(path: str, transform, image_size: int):
    from torchvision import datasets

    try:
        ds = datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as e:  # no class folder, or class folders without images
        raise DatasetError(f"--dataset {path} holds no images in class folders (an ImageFolder has one "
                           f"sub-folder of images per class): {e}") from None
    if len(ds.classes) < 2:
        raise DatasetError(f"--dataset {path} has one class ({ds.classes[0]!r}); a classifier needs at "
                           f"least two class folders")
    check_images([p for p, _ in ds.samples], image_size)
    return ds


def check_images(paths: Sequence[str], image_size: int) -> None:
    """Decode every image once (JPEGs in draft mode, at about ``image_size``); DatasetError
    names the first file that cannot be read."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.draft("RGB", (image_size, image_size))
                im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
            raise DatasetError(f"--dataset: image {p} cannot be read ({type(e).__name__}: {e})") from None


def load(name: str, image_size: int = 32, train_subset: Optional[int] = None,
         test_subset: Optional[int] = None) -> Splits:
    """The dataset ``name`` (``"digits"`` or an ImageFolder path), optionally cut to the first
    ``train_subset`` / ``test_subset`` examples of each split (for quick runs and tests)."""
    if name == DIGITS:
        splits = digits(image_size)
    elif os.path.isdir(name):
        splits = image_folder(name, image_size)
    else:
        raise DatasetError(f"--dataset must be 'digits' or an ImageFolder directory, not {name!r}")
    if train_subset is not None:
        splits.train = _first(splits.train, train_subset)
    if test_subset is not None:
        splits.test = _first(splits.test, test_subset)
    return splits


def _first(ds: Dataset, n: int) -> Dataset:
    return Subset(ds, list(range(min(n, len(ds)))))


def epoch_order(n: int, generator: torch.Generator, seed: int, epoch: int) -> List[int]:
    """The order of the ``n`` training examples in epoch ``epoch`` of a run seeded ``seed``:
    ``generator`` is reseeded from ``(seed, epoch)`` and draws a permutation."""
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()
