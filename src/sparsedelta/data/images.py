"""Images for the diffusion task: a folder of image files (captions optional) or the embedded
scikit-learn digits. Every image becomes a (C, H, W) float32 tensor in [-1, 1] at the model's size.

Captions, when a folder has them, come from either
- `metadata.jsonl` in the folder, one JSON object per image: {"file_name": "a.png", "text": "..."}
  (the layout of Hugging Face's `imagefolder`; --text-column names another caption field), or
- a text file beside each image with the same stem (`a.png` and `a.txt`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
CAPTION_FIELD = "text"


@dataclass
class ImageSet:
    images: torch.Tensor  # (n, C, H, W), float32 in [-1, 1]
    captions: list[str] | None  # one per image, or None: the set has no captions
    names: list[str]  # file names (digits: "digit-<label>-<index>")
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: list[int]) -> ImageSet:
        captions = [self.captions[i] for i in indices] if self.captions is not None else None
        return ImageSet(self.images[indices], captions, [self.names[i] for i in indices], self.source)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8-like values 0..255 -> [-1, 1], the range diffusion models are trained in."""
    return pixels.float() / 127.5 - 1.0


def read_image_folder(folder: str | Path, size: int, channels: int, caption_field: str | None = None) -> ImageSet:
    """Every image file directly in `folder`, in name order, centre-cropped to a square and resized to
    `size` (bicubic), as grey (1 channel) or RGB (3 channels)."""
    from PIL import Image  # diffusers depends on pillow; only this reader needs it

    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--task diffusion reads a folder of images; {root} is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if channels not in (1, 3):
        raise UsageError(f"the model takes {channels} input channels; images can fill 1 (grey) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    tensors = []
    for path in files:
        try:
            with Image.open(path) as img:
                square = _square(img.convert(mode), size)
        except OSError as e:
            raise UsageError(f"cannot read image {path}: {e}; remove or replace the file") from e
        data = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
        tensors.append(to_unit_range(data.permute(2, 0, 1)))
    captions = read_captions(root, [p.name for p in files], caption_field or CAPTION_FIELD)
    return ImageSet(torch.stack(tensors), captions, [p.name for p in files], str(root))


def _square(img, size: int):
    """Resize the shorter side to `size`, then crop the centre (as diffusers' training scripts do)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_captions(root: Path, names: list[str], field: str) -> list[str] | None:
    """The caption of each image (metadata.jsonl, else same-stem .txt files), or None when there are none.
    Captions for some images but not all are refused: a conditional model needs every one."""
    found: dict[str, str] = {}
    metadata = root / METADATA
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found[str(row["file_name"])] = str(row[field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(
                    f"{metadata}, line {number}: expected a JSON object with \"file_name\" and {field!r} ({e}); "
                    "fix the line or name the caption field with --text-column"
                ) from e
    else:
        for name in names:
            text = (root / name).with_suffix(".txt")
            if text.is_file():
                found[name] = text.read_text(encoding="utf-8").strip()
    if not found:
        return None
    missing = [n for n in names if n not in found]
    if missing:
        where = METADATA if metadata.is_file() else "a .txt file of the same name"
        raise UsageError(f"{root}: {len(missing)} image(s) have no caption in {where} (first: {missing[0]}); "
                         "caption every image or none")  # fmt: skip
    return [found[n] for n in names]


def digits(classes: tuple[int, ...], size: int = 16) -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits (grey levels 0..16), those of `classes`, upscaled
    bilinearly to `size` pixels; the caption of each is its digit as a word."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UsageError("the embedded diffusion task needs scikit-learn (its digits): "
                         "pip install 'sparsedelta[diffusion]', or give --train-file with a folder of images") from e  # fmt: skip
    data = load_digits()
    labels = torch.as_tensor(data.target)
    keep = [i for i in range(len(labels)) if int(labels[i]) in classes]
    pixels = torch.as_tensor(data.images[keep], dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    captions = [f"a handwritten {words[int(labels[i])]}" for i in keep]
    names = [f"digit-{int(labels[i])}-{i}" for i in keep]
    return ImageSet(pixels.contiguous(), captions, names, f"scikit-learn digits {','.join(map(str, classes))}")


def carve(images: ImageSet, fractions: dict[str, float], seed: int) -> dict[str, ImageSet]:
    """Seeded held-out splits of one set: {"validation": ..., "test": ..., "train": the rest, in order}."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    out = {}
    for role, fraction in fractions.items():
        n = max(1, round(fraction * len(images)))
        if n >= len(order):
            raise UsageError(f"{images.source} has too few images ({len(images)}) to carve a {role} split; "
                             f"give --{role}-file with a folder of its own")  # fmt: skip
        out[role], order = images.subset(sorted(order[:n])), order[n:]
    out["train"] = images.subset(sorted(order))
    return out


def limit(images: ImageSet, most: int | None, seed: int) -> ImageSet:
    """A seeded subset of at most `most` images, in their order."""
    if not most or len(images) <= most:
        return images
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:most]
    return images.subset(sorted(keep.tolist()))
