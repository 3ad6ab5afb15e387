"""``--data.decode device``: JPEGs decoded on the training device (nvJPEG on CUDA), crops drawn in the loader workers.

Why: MAE's step is cheap per image, and a PIL pipeline needs ~44 cores to feed one H200 at MAE-B speed (worked by
hand: ~6.7k img/s for MAE-B at 40% MFU over the ~155 img/s per core of a WebDataset loader in libffcv/ffcv
docs/benchmarks.rst); batched ``torchvision.io.decode_jpeg(device="cuda")`` decodes ~20x faster per GPU than one
core does (7,834 img/s batched on an A100 vs 393 on one CPU thread, pytorch/vision#8496). The workers keep the cheap
part: reading tar members and JPEG headers.

The work is split in two:

* Worker side (``DeviceDecodeTransform``): the reader leaves the image field undecoded and only parses its header
  (``read_header``: PIL ``Image.open`` without ``load()``), which gives the size. The crop and flip are drawn from
  that size with the sample's seeded RNG, in the same order as the host transform draws them, so exact resume
  works as on the host path and a sample gets the same geometry under either decode. What leaves the worker is
  ``{"image": PendingImage, "key", "label"}``: the JPEG bytes plus the numbers of the geometry.
* Device side (``decode_batch``, called from ``ShardedDataModule.on_after_batch_transfer``): the batch's JPEGs are
  decoded together with ``decode_jpeg(list, device=...)``, each is cropped and resized (bicubic, antialiased),
  flipped where drawn, and the batch is stacked into uint8 ``(B, 3, S, S)``; the datamodule then normalises it as
  on the host path. Trainers see the same batch keys and dtypes under both decodes.

``PendingImage`` is a plain object on purpose: collate keeps it in a list, DataLoader pinning and Lightning's
batch transfer pass it through untouched (both walk tuples, dataclasses and ``bytes`` element by element, which
for a JPEG would cost seconds per batch), and reading its crop box costs no device-to-host sync.

Images nvJPEG is not given: a field whose bytes do not start with the JPEG marker FF D8 (PNG, WebP, ...) or a
JPEG that is neither RGB nor greyscale (CMYK) is decoded in the worker with PIL as on the host path, cropped there
with the same geometry, and travels as a uint8 ``(3, S, S)`` tensor inside its PendingImage: such samples cost host
time but train the same. A JPEG whose header parses but whose pixels do not decode on the device (truncated,
corrupt entropy data) is retried with libjpeg-turbo on the host; if that fails too, the sample is replaced in its
batch by another sample of the same batch (image, label and key together), and ``decode_batch`` reports its key
so that the datamodule counts and warns.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from .transforms import Geometry, RandomResizedCropFlip, ResizeCenterCrop

__all__ = ["DeviceDecodeError", "DeviceDecodeTransform", "EncodedImage", "PendingImage", "decode_batch",
           "device_transform", "draw_geometry", "read_header"]

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8"  # start-of-image marker
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg(mode=RGB) handles on every device
BICUBIC = InterpolationMode.BICUBIC


class DeviceDecodeError(RuntimeError):
    """No image of a batch could be decoded: there is nothing to stand in for the broken ones."""


# ----------------------------------------------------------------------------------------------------
# Worker side


class EncodedImage:
    """An image field read up to its header: the file's bytes and the PIL image opened on them, not loaded."""

    __slots__ = ("data", "header")

    def __init__(self, data: bytes, header: Image.Image):
        self.data = data
        self.header = header


def read_header(key: str, data: bytes) -> EncodedImage | Image.Image:
    """The reader's decode of a header-only field: an ``EncodedImage`` for an RGB or greyscale JPEG, else the
    field decoded with PIL to RGB as on the host path. Raises on bytes PIL cannot open (a corrupt sample)."""
    if data[:2] == JPEG_MAGIC:
        header = Image.open(io.BytesIO(data))  # parses the markers up to the first scan: size and mode, no pixels
        if header.format == "JPEG" and header.mode in DEVICE_MODES:
            return EncodedImage(data, header)
        why = f"a {header.mode} {header.format}"
    else:
        why = f"not a JPEG (starts with {data[:4].hex()})"
    _note_host_decode(key, why)
    with io.BytesIO(data) as stream:
        image = Image.open(stream)
        image.load()
    return image.convert("RGB")


_host_decodes = 0


def _note_host_decode(key: str, why: str) -> None:
    global _host_decodes
    _host_decodes += 1
    if _host_decodes in (1, 100, 10_000):  # per worker process: a mixed-format dataset is legal, say so rarely
        log.info("decode='device': field %r is %s; decoded and cropped on the host (%d such in this worker)",
                 key.lstrip("."), why, _host_decodes)


def draw_geometry(geometry: Geometry, image: Image.Image | torch.Tensor
                  ) -> tuple[tuple[int, int, int, int] | None, bool]:
    """``(crop box (top, left, height, width) or None, flip)`` for one image, drawn from the global torch RNG.

    Same draws in the same order as the host transforms: torchvision's ``RandomResizedCrop.get_params`` (it reads
    only the image's size, so a header-only PIL image is enough), then ``torch.rand(1) < flip_p`` as
    ``v2.RandomHorizontalFlip`` draws it. ``ResizeCenterCrop`` draws nothing.
    """
    if isinstance(geometry, RandomResizedCropFlip):
        box = RandomResizedCrop.get_params(image, list(geometry.scale), list(geometry.ratio))
        flip = bool(torch.rand(1) < geometry.flip_p)
        return box, flip
    if isinstance(geometry, ResizeCenterCrop):
        return None, False
    raise TypeError(f"draw_geometry: unknown geometry {geometry!r}")


class PendingImage:
    """One sample's image on its way to the device: JPEG bytes to decode there, or pixels made on the host.

    ``crop`` (top, left, height, width) in source pixels is resized to ``size`` x ``size``; with ``crop`` None,
    the short side is resized to ``resize`` and the centre ``size`` x ``size`` kept. ``source_size`` (height,
    width) is the header's, checked against the decoded image.
    """

    __slots__ = ("jpeg", "pixels", "source_size", "crop", "resize", "size", "flip")

    def __init__(self, jpeg: bytes | None, pixels: torch.Tensor | None, source_size: tuple[int, int],
                 crop: tuple[int, int, int, int] | None, resize: int, size: int, flip: bool):
        self.jpeg = jpeg
        self.pixels = pixels
        self.source_size = source_size
        self.crop = crop
        self.resize = resize
        self.size = size
        self.flip = flip

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)

    def __repr__(self) -> str:
        what = f"jpeg {len(self.jpeg)} B" if self.jpeg is not None else f"pixels {tuple(self.pixels.shape)}"
        return (f"PendingImage({what}, source {self.source_size}, crop {self.crop}, resize {self.resize}, "
                f"size {self.size}, flip {self.flip})")


def _resample(image: torch.Tensor | Image.Image, pending: PendingImage):
    """Crop/resize/flip one decoded image (uint8 tensor on any device, or PIL) as ``pending`` says."""
    size = [pending.size, pending.size]
    if pending.crop is not None:
        image = F.resized_crop(image, *pending.crop, size, interpolation=BICUBIC, antialias=True)
    else:
        image = F.center_crop(F.resize(image, [pending.resize], interpolation=BICUBIC, antialias=True), size)
    return F.horizontal_flip(image) if pending.flip else image


class DeviceDecodeTransform:
    """Worker side of decode="device": decoded-sample dict (``image_key`` read by ``read_header``) ->
    ``{"image": PendingImage, "key": str, "label": int (if the sample has "cls")}``, the fields and order of
    ``transforms.SampleTransform``."""

    def __init__(self, geometry: Geometry, image_key: str = "jpg"):
        self.geometry = geometry
        self.image_key = image_key

    def __call__(self, sample: dict) -> dict:
        value = sample[self.image_key]
        image = value.header if isinstance(value, EncodedImage) else value
        crop, flip = draw_geometry(self.geometry, image)
        width, height = image.size
        resize = getattr(self.geometry, "resize", 0)
        pending = PendingImage(None, None, (height, width), crop, resize, self.geometry.size, flip)
        if isinstance(value, EncodedImage):
            pending.jpeg = value.data
        else:  # decoded on the host by read_header: crop it here, as the host path would
            pending.pixels = F.pil_to_tensor(_resample(value, pending))
        out = {"image": pending, "key": sample["__key__"]}
        if "cls" in sample:
            out["label"] = int(sample["cls"])
        return out


def device_transform(transform: object, name: str) -> DeviceDecodeTransform:
    """The worker-side transform for decode="device" of a host transform with a ``geometry`` description."""
    geometry = getattr(transform, "geometry", None)
    if not isinstance(geometry, (RandomResizedCropFlip, ResizeCenterCrop)):
        raise ValueError(
            f"--data.decode device supports geometry-only transforms (random-resized-crop + flip: "
            f"mae_train_transform, linear_probe_train_transform; resize + center crop: eval_transform), but the "
            f"datamodule's {name} ({type(transform).__name__}) describes no geometry (its `geometry` is "
            f"{geometry!r}). Fine-tuning's RandAugment needs PIL images: use --data.decode host."
        )
    return DeviceDecodeTransform(geometry)


# ----------------------------------------------------------------------------------------------------
# Device side


def _bytes_tensor(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():  # decode_jpeg only reads its input; the buffer being read-only is fine
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG on ``device``, else with libjpeg-turbo on the host (nvJPEG rejects some valid files); None when
    neither decodes it."""
    for where in dict.fromkeys([device, torch.device("cpu")]):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError:
            continue
    return None


def _decode_jpegs(pending: Sequence[PendingImage], device: torch.device) -> list[torch.Tensor | None]:
    indices = [i for i, p in enumerate(pending) if p.jpeg is not None]
    out: list[torch.Tensor | None] = [None] * len(pending)
    if not indices:
        return out
    data = [_bytes_tensor(pending[i].jpeg) for i in indices]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole batched call: decode one by one to find it
        decoded = [_decode_one(d, device) for d in data]
    for i, image in zip(indices, decoded):
        if image is not None and tuple(image.shape[-2:]) != pending[i].source_size:
            image = None  # the header lied about the size: the drawn crop does not fit these pixels
        out[i] = image
    return out


def decode_batch(batch: dict, device: torch.device | str) -> list[str]:
    """Replace ``batch["image"]`` (a list of PendingImage) by the uint8 ``(B, 3, S, S)`` images on ``device``.

    JPEGs are decoded together (batched nvJPEG on CUDA), then each image is cropped, resized and flipped on the
    device. A sample whose image cannot be decoded is replaced in every field of the batch (tensors and lists of
    length B) by the next sample that decoded, so images and labels stay paired. Returns the keys of the replaced
    samples; raises ``DeviceDecodeError`` when no image of the batch decodes.
    """
    device = torch.device(device)
    pending: list[PendingImage] = batch["image"]
    decoded = _decode_jpegs(pending, device)
    images: list[torch.Tensor | None] = []
    for p, image in zip(pending, decoded):
        if p.pixels is not None:
            images.append(p.pixels.to(device, non_blocking=True))
        else:
            images.append(None if image is None else _resample(image, p))
    good = [i for i, image in enumerate(images) if image is not None]
    keys = batch.get("key") or [f"#{i}" for i in range(len(pending))]
    failed = [i for i, image in enumerate(images) if image is None]
    if not good:
        raise DeviceDecodeError(
            f"None of the {len(pending)} images of a batch decoded on {device} (keys {keys[:5]}...): the shards hold "
            "broken JPEGs whose headers parse. Check them with PIL (Image.open(...).load()), or re-write them."
        )
    failed_keys = [keys[i] for i in failed]
    size = len(pending)
    for i in failed:
        source = next(j for j in good if j > i) if good[-1] > i else good[0]
        images[i] = images[source]
        for name, value in batch.items():
            if name == "image":
                continue
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
                value[i] = value[source]
            elif isinstance(value, list) and len(value) == size:
                value[i] = value[source]
    batch["image"] = torch.stack(images)
    return failed_keys
