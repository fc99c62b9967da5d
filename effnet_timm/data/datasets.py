"""ImageNet validation sets as people have them, read as encoded bytes for the official preprocessing.

Layouts (:func:`open_imagenet_val`):

* **synset folders**: ``DATA/n01440764/*.JPEG`` ...; each folder's WordNet id gives its index in the
  1000-class ImageNet-1k order (timm's ``ImageNetInfo``), whichever subset of the synsets is present.
* **flat + ground truth**: ``DATA/ILSVRC2012_val_00000001.JPEG`` ... with ``LOC_val_solution.csv``
  (Kaggle), the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC2012_IDs, mapped to
  synsets by the devkit's ``meta.mat`` beside it) or a text file with one synset per image in id order
  (TF-slim's ``imagenet_2012_validation_synset_labels.txt``).
* **timm datasets**: whatever ``timm.data.create_dataset`` reads as a map-style dataset (a folder,
  a ``.tar``, ``hfds/...``). Streaming (iterable) datasets are refused: their length is not known up
  front, so no one could check that every image was counted exactly once.

Samples are ``(input tensor, label, index, error)``: a file that cannot be read or decoded comes back
as an error string (and a zero tensor) instead of an exception, so the evaluation loop in the main
process can name the file in one line; an exception raised in a DataLoader worker would arrive as
a multi-line traceback of the worker.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import InputError, first_line
from .preprocessing import ImageTooLargeError, max_image_bytes, read_image_file

__all__ = [
    'IMAGE_EXTENSIONS',
    'GROUND_TRUTH_FILES',
    'ImageSource',
    'FileSource',
    'TimmSource',
    'EvalDataset',
    'open_imagenet_val',
    'imagenet_synsets',
    'read_ground_truth',
    'imagenet_remap',
]

# The image files a folder contributes (case-insensitive), here and in `predict`: the formats decode_image reads.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SYNSET = re.compile(r'n\d{8}')
FLAT_NAME = re.compile(r'ILSVRC2012_val_(\d{8})\.[A-Za-z]+')
# Searched for in DATA, then its parent, when --ground-truth is not given (first found wins).
GROUND_TRUTH_FILES = (
    'LOC_val_solution.csv',
    'ILSVRC2012_validation_ground_truth.txt',
    'ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt',
    'imagenet_2012_validation_synset_labels.txt',
)
EXPECTED_LAYOUTS = (
    'one folder per ImageNet-1k synset (n01440764/ ...), or a flat folder of '
    'ILSVRC2012_val_*.JPEG with a ground-truth file (' + ', '.join(GROUND_TRUTH_FILES[:2]) + ')'
)
# What to do with a folder of other classes (validate scores the 1000 ImageNet-1k outputs against synset labels).
OTHER_CLASSES = (
    "; for a dataset of other classes, run timm's own validate.py (timm repository) with the models registered: "
    'effnet-timm run validate.py --data-dir DATA --model MODEL --num-classes N --checkpoint FILE'
)
# Errors that mean "this file is not a readable image": they become a per-sample error, not an exception.
# Pillow raises SyntaxError/EOFError on some malformed headers; simplejpeg raises ValueError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, IndexError)


def imagenet_synsets() -> dict[str, int]:
    """WordNet id -> class index of the 1000 ImageNet-1k classes (timm's order, the models' output order)."""
    from timm.data import ImageNetInfo

    return {name: i for i, name in enumerate(ImageNetInfo('imagenet-1k').label_names())}


# ----------------------------------------------------------------------------- sources


class ImageSource:
    """Names, labels and encoded images of a dataset: ``read(i)`` returns ``(bytes or PIL image, label)``."""

    root: str
    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def read(self, index: int) -> tuple[bytes | Image.Image, int]:
        raise NotImplementedError


class FileSource(ImageSource):
    """Image files under ``root`` with known labels."""

    def __init__(self, root: Path, names: Sequence[str], labels: Sequence[int], description: str) -> None:
        self.root = str(root)
        self.names = list(names)
        self.labels = list(labels)
        self.description = description

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index]

    def read(self, index: int) -> tuple[bytes, int]:
        return read_image_file(os.path.join(self.root, self.names[index])), self.labels[index]


class TimmSource(ImageSource):
    """A map-style timm dataset, read through its reader so that nothing is decoded or skipped behind our back
    (timm's ``ImageDataset`` replaces an unreadable sample by the next one)."""

    def __init__(self, dataset: Any, root: str, description: str, remap: dict[int, int] | None = None) -> None:
        self.reader = dataset.reader
        self.root = root
        self.description = description
        self.remap = remap  # reader's class index -> ImageNet-1k index; None: the dataset's own label space

    def __len__(self) -> int:
        return len(self.reader)

    def name(self, index: int) -> str:
        return str(self.reader.filename(index))

    def label_summary(self) -> str:
        """The dataset's own classes, in a few words (for an error message)."""
        names = sorted(_class_names(self.reader), key=str)
        if not names:
            return 'class indices without names'
        shown = ', '.join(repr(str(n)) for n in names[:3])
        return f'{len(names)} classes: {shown}{", ..." if len(names) > 3 else ""}'

    def read(self, index: int) -> tuple[bytes | Image.Image, int]:
        img, target, *_ = self.reader[index]
        target = int(target) if self.remap is None else self.remap[int(target)]
        if isinstance(img, Image.Image):  # some hfds datasets hold decoded images only
            return img, int(target)
        if isinstance(img, (bytes, bytearray)):
            return bytes(img), int(target)
        if isinstance(img, (str, os.PathLike)):
            return read_image_file(img), int(target)
        try:
            limit = max_image_bytes()
            data = img.read(limit + 1)  # a tar member or stream is read no further than any image can be
            if len(data) > limit:
                raise ImageTooLargeError(f'more than {limit:,} bytes: larger than any image within the pixel limit')
            return data, int(target)
        finally:
            close = getattr(img, 'close', None)
            if close is not None:
                close()


# ----------------------------------------------------------------------------- the torch dataset


class EvalDataset(torch.utils.data.Dataset):
    """``(input, label, index, error)`` per image of ``source`` under ``transform`` (picklable for workers).

    ``input_shape`` is the shape of the zero tensor that stands in for an image that failed (its ``error``
    names the file and the reason; it is never counted)."""

    def __init__(
        self, source: ImageSource, transform: Callable[[Any], torch.Tensor], input_shape: tuple[int, int, int]
    ) -> None:
        self.source = source
        self.transform = transform
        self.input_shape = tuple(input_shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        label = -1
        try:
            data, label = self.source.read(index)
            x = self.transform(data)
        except DECODE_ERRORS as err:
            return torch.zeros(self.input_shape), label, index, self._describe(index, err)
        return x, label, index, ''

    def _describe(self, index: int, err: BaseException) -> str:
        name = os.path.join(self.source.root, self.source.name(index))
        if isinstance(err, ImageTooLargeError):
            return f'{name}: image refused: {first_line(err)}'
        if type(err).__name__ == 'UnidentifiedImageError':  # its message names a BytesIO object, not the file
            return f'{name}: cannot decode image: not an image format Pillow reads'
        if isinstance(err, OSError) and err.strerror:
            return f'{name}: cannot read image: {err.strerror}'
        return f'{name}: cannot decode image: {first_line(err)}'


# ----------------------------------------------------------------------------- layouts


def open_imagenet_val(data: Path, dataset: str = '', ground_truth: Path | None = None) -> ImageSource:
    """The ImageNet-val images and labels at ``data`` (see the module docstring for the layouts)."""
    if dataset or data.is_file():
        if ground_truth is not None:
            raise InputError('--ground-truth is for a flat folder of ILSVRC2012_val_* images, not --dataset')
        return _timm_source(data, dataset)
    if not data.is_dir():
        raise InputError(f'{data}: no such folder')
    entries = sorted(os.scandir(data), key=lambda e: e.name)
    folders = [e for e in entries if e.is_dir() and not e.name.startswith('.')]
    images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    # ILSVRC2012_val_* files make it a flat folder (a devkit folder may sit beside them).
    if ground_truth is not None or any(FLAT_NAME.fullmatch(name) for name in images) or (images and not folders):
        return _flat_source(data, images, ground_truth)
    if folders:
        return _synset_source(data, [e.name for e in folders], images)
    raise InputError(f'{data}: no images (expected {EXPECTED_LAYOUTS})')


def _synset_source(root: Path, folders: list[str], stray_images: list[str]) -> FileSource:
    synsets = imagenet_synsets()
    for folder in folders:
        if not SYNSET.fullmatch(folder):
            raise InputError(
                f"{root / folder}: '{folder}' is not a WordNet synset id: validate reads {EXPECTED_LAYOUTS}"
                + OTHER_CLASSES
            )
        if folder not in synsets:
            raise InputError(f'{root / folder}: synset {folder} is not one of the 1000 ImageNet-1k classes')
    if stray_images:
        raise InputError(
            f'{root / stray_images[0]}: an image beside the synset folders (each image must be in '
            'the folder of its synset)'
        )
    names, labels = [], []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(os.path.join(rel, filename))
                    labels.append(synsets[folder])
    if not names:
        raise InputError(f'{root}: the synset folders hold no images')
    return FileSource(root, names, labels, f'{len(names):,} images in {len(folders)} synset folders')


def _flat_source(root: Path, images: list[str], ground_truth: Path | None) -> FileSource:
    if not images:
        raise InputError(f'{root}: no images (expected {EXPECTED_LAYOUTS})')
    gt_path = ground_truth or _find_ground_truth(root)
    by_id = read_ground_truth(gt_path)
    synsets = imagenet_synsets()
    labels = []
    for name in images:
        match = FLAT_NAME.fullmatch(name)
        if match is None:
            raise InputError(
                f'{root / name}: not an ILSVRC2012_val_NNNNNNNN image name (a flat folder is '
                f'labelled by that number from {gt_path.name})'
            )
        synset = by_id.get(int(match.group(1)))
        if synset is None:
            raise InputError(f'{root / name}: {gt_path} has no label for it')
        if synset not in synsets:
            raise InputError(f'{gt_path}: label {synset} of {name} is not one of the 1000 ImageNet-1k synsets')
        labels.append(synsets[synset])
    return FileSource(root, images, labels, f'{len(images):,} images, labels from {gt_path}')


def _find_ground_truth(root: Path) -> Path:
    for folder in (root, root.parent):
        for name in GROUND_TRUTH_FILES:
            if (folder / name).is_file():
                return folder / name
    raise InputError(
        f'{root}: a flat folder of images needs a ground-truth file ({", ".join(GROUND_TRUTH_FILES)}) '
        'in it or beside it, or --ground-truth FILE'
    )


def read_ground_truth(path: Path) -> dict[int, str]:
    """Validation image number (1-based, as in ``ILSVRC2012_val_00000001``) -> synset, from a ground-truth file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f'{path}: cannot read ground truth: {err.strerror or first_line(err)}') from None
    if path.suffix.lower() == '.csv':
        return _read_loc_solution(path, text)
    tokens = text.split()
    if not tokens:
        raise InputError(f'{path}: empty ground-truth file')
    if all(SYNSET.fullmatch(t) for t in tokens):  # one synset per image, in image-number order
        return {i: t for i, t in enumerate(tokens, 1)}
    if all(t.isdigit() for t in tokens):  # the devkit's ILSVRC2012_IDs, in image-number order
        id_to_synset = _devkit_synsets(path)
        try:
            return {i: id_to_synset[int(t)] for i, t in enumerate(tokens, 1)}
        except KeyError as err:
            raise InputError(f'{path}: ILSVRC2012_ID {err.args[0]} is not in {path.parent / "meta.mat"}') from None
    raise InputError(f'{path}: expected one ILSVRC2012_ID (devkit) or one synset id per line')


def _read_loc_solution(path: Path, text: str) -> dict[int, str]:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header[:2]] != ['ImageId', 'PredictionString']:
        raise InputError(f'{path}: expected the header ImageId,PredictionString (LOC_val_solution.csv)')
    by_id = {}
    for line, row in enumerate(rows, 2):
        match = FLAT_NAME.fullmatch(row[0] + '.JPEG') if row else None
        synset = row[1].split()[0] if len(row) > 1 and row[1].split() else ''
        if match is None or not SYNSET.fullmatch(synset):
            raise InputError(
                f'{path}: line {line}: expected ILSVRC2012_val_NNNNNNNN,<synset> <box> ..., got {",".join(row)[:80]!r}'
            )
        by_id[int(match.group(1))] = synset
    return by_id


def _devkit_synsets(gt_path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 leaf classes, from the devkit's meta.mat beside the ground truth."""
    meta = gt_path.parent / 'meta.mat'
    if not meta.is_file():
        raise InputError(
            f"{gt_path}: holds ILSVRC2012_IDs; mapping them to synsets needs the devkit's "
            f'meta.mat beside it ({meta} is missing)'
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise InputError(f"{meta}: reading the devkit's meta.mat needs scipy (pip install scipy)") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)['synsets']
        table = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets if int(s['num_children']) == 0}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise InputError(f"{meta}: not the devkit's meta.mat ({first_line(err)})") from None
    return table


def _timm_source(data: Path, dataset: str) -> TimmSource:
    from timm.data import create_dataset

    prefix = dataset.partition('/')[0].lower() if '/' in dataset else ''
    if prefix in ('wds', 'tfds', 'hfids'):
        raise InputError(
            f'--dataset {dataset}: a streaming (iterable) dataset; validate reads map-style datasets '
            '(a folder, a .tar, hfds/...) so that it can count every image exactly once'
        )
    if prefix == 'torch':
        raise InputError(f'--dataset {dataset}: torchvision datasets decode with Pillow; use the folder it reads')
    try:
        ds = create_dataset(dataset, root=str(data), split='validation', load_bytes=True)
    except (OSError, ValueError, AssertionError, KeyError, ImportError) as err:
        raise InputError(f'{data}: timm cannot read it as dataset {dataset!r}: {first_line(err)}') from None
    if not hasattr(ds, 'reader') or not hasattr(ds.reader, '__getitem__'):
        raise InputError(f'--dataset {dataset}: not a map-style timm dataset')
    description = f'{len(ds.reader):,} images via timm create_dataset({dataset!r})'
    remap = imagenet_remap(_class_names(ds.reader)) if prefix else _synset_remap(data, ds.reader)
    return TimmSource(ds, str(data), description, remap)


def _class_names(reader: Any) -> dict[Any, int]:
    return dict(getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None) or {})


def imagenet_remap(class_to_idx: dict[Any, int]) -> dict[int, int] | None:
    """A dataset's class index -> ImageNet-1k index, when its class names are ImageNet-1k's (WordNet synset ids,
    or the class names of the Hugging Face ``imagenet-1k`` dataset: 'tench, Tinca tinca', ...); else None."""
    from timm.data import ImageNetInfo

    if not class_to_idx:
        return None
    for table in (imagenet_synsets(), {d: i for i, d in enumerate(ImageNetInfo('imagenet-1k').label_descriptions())}):
        if all(isinstance(name, str) and name in table for name in class_to_idx):
            return {int(index): table[name] for name, index in class_to_idx.items()}
    return None


def _synset_remap(data: Path, reader: Any) -> dict[int, int]:
    """Folder and tar readers number the class folders they found 0..K-1; map them through the folders' synsets
    (timm's own ``class_map`` would silently drop the images of folders missing from the map)."""
    names = getattr(reader, 'class_to_idx', None) or getattr(reader, 'class_name_to_idx', None) or {}
    synsets = imagenet_synsets()
    for name in names:
        if name not in synsets:
            raise InputError(
                f"{data}: class folder '{name}' is not an ImageNet-1k synset id: validate reads {EXPECTED_LAYOUTS}"
                + OTHER_CLASSES
            )
    return {index: synsets[name] for name, index in names.items()}
