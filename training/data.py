"""
The datasets of train_tiny.py as uint8 images (N, c, S, S) with labels, a training and a held-out
split: CIFAR-10 (the python version: folder, MD5-checked tarball, or a download), Fashion-MNIST
(IDX files, or Debian's dataset-fashion-mnist package), Sub-IN (ImageNet class folders, decoded
once and cached) and synthetic gratings (no files); the copy probe, a variant of any of them
whose every token's answer sits in one far key; and Batches, the batch of a step as a function of
(seed, step), so that a resumed run sees exactly the batches of an uninterrupted one.
"""

import gzip
import hashlib
import json
import os
import pickle
import signal
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cli import UserError, check_fits, check_writable
from .files import atomic_write, file_digest

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_DIRS = [DEBIAN_FASHION_DIR]                     # where Fashion-MNIST is looked for after the data folder
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}
DEFAULT_DATA_DIR = "./data"                             # the data folder when none is given (made for a download)
DATASETS = ("cifar10", "subin", "fashion-mnist", "synthetic")
SYNTHETIC_BYTES_PER_PIXEL = 3 * 8 * 2                   # make_synthetic: float64 RGB, the grating and the image
PROBES = ("copy",)


@dataclass
class ImageData:
    train_x: torch.Tensor            # (N, c, S, S) uint8
    train_y: torch.Tensor            # (N,) long
    val_x: torch.Tensor              # (M, c, S, S) uint8, held out
    val_y: torch.Tensor
    classes: list                    # class names, index = label
    flip: bool                       # random horizontal flips in training


def to_float(images):
    """uint8 images -> float32 in [-1, 1], the range the model trains on."""
    return images.float() / 127.5 - 1


def to_uint8(x):
    """Model output in [-1, 1] -> uint8 images on the CPU, as they would be saved."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def copy_probe(images):
    """The copy probe: each image becomes [A; A], A the image squashed to half its height (each
    pair of rows averaged), so every token's content equals the token half the grid below or above
    it (its partner). uint8 (N, c, S, S) -> uint8 (N, c, S, S), S even."""
    x = images.float()
    half = (x[:, :, 0::2] + x[:, :, 1::2]) / 2                  # A: (N, c, S/2, S)
    return torch.cat([half, half], dim=2).round().to(torch.uint8)


def not_a_folder(path):
    """Why `path` (not a folder) is no data folder, in words."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def load_cifar10(data_dir, explicit=True):
    """The official python-version CIFAR-10: a cifar-10-batches-py folder, or its tarball
    (checked against its MD5 before extraction), or a download of the tarball. explicit: the
    user named data_dir, so it must exist (the default ./data is created for the download)."""
    data_dir = Path(data_dir)
    if explicit and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} {not_a_folder(data_dir)}: create it (CIFAR-10 is then downloaded "
                        f"into it), "
                        f"or point it at the folder that holds cifar-10-batches-py")
    folder, tarball = data_dir / "cifar-10-batches-py", data_dir / "cifar-10-python.tar.gz"
    if not folder.is_dir():
        if not tarball.exists():
            print(f"downloading CIFAR-10 to {tarball} ...")
            with atomic_write(tarball) as part:                 # a failed or stopped download leaves nothing behind
                try:
                    urllib.request.urlretrieve(CIFAR10_URL, part)
                except urllib.error.URLError as e:              # the network (a full disk is atomic_write's to say)
                    raise UserError(f"cannot download CIFAR-10 ({e.__class__.__name__}: {e}); without network, put "
                                    f"cifar-10-python.tar.gz (from {CIFAR10_URL}) or its extracted cifar-10-batches-py "
                                    f"folder into {data_dir}/") from None
        digest = file_digest(tarball)
        if digest != CIFAR10_MD5:
            raise UserError(f"{tarball} has MD5 {digest}, expected {CIFAR10_MD5}: the file is corrupt or not "
                            f"CIFAR-10's python version; delete it and download it again")
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:   # extract aside, then rename: never half a folder
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(Path(tmp) / "cifar-10-batches-py", folder)

    def read(name):
        try:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return x, np.asarray(batch[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise UserError(f"cannot read {folder / name} ({e.__class__.__name__}: {e}): the CIFAR-10 folder is "
                            f"incomplete or corrupt; delete {folder} and run again") from None

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    val_x, val_y = read("test_batch")
    train_x, train_y = (torch.from_numpy(np.concatenate(part)) for part in zip(*train))
    return ImageData(train_x, train_y, torch.from_numpy(val_x), torch.from_numpy(val_y), CIFAR10_CLASSES, flip=True)


def read_idx(path):
    """An IDX file (MNIST format), gzipped or not -> numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}: {e}): the file is corrupt; replace it") from None


def load_fashion_mnist(data_dir, explicit=True):
    """Fashion-MNIST IDX files from --data-dir (or its fashion-mnist/ folder) or Debian's package
    folder; 28 x 28 padded to 32 x 32, one channel. explicit: the user named data_dir, so it must
    exist; files found in another folder are announced."""
    data_dir = Path(data_dir)
    if explicit and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} {not_a_folder(data_dir)}: point it at the folder with the "
                        f"Fashion-MNIST IDX "
                        f"files, or leave --data-dir out to read Debian's package folder {DEBIAN_FASHION_DIR}")
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for folder in [data_dir, data_dir / "fashion-mnist", *map(Path, FASHION_DIRS)]:
        paths = [next((p for p in (folder / (n + ".gz"), folder / n) if p.exists()), None) for n in names]
        if all(paths):
            break
    else:
        raise UserError(f"Fashion-MNIST not found: put {', '.join(n + '.gz' for n in names)} into {data_dir}/, "
                        f"or install Debian's package: apt-get install dataset-fashion-mnist")
    if folder != data_dir:
        print(f"reading Fashion-MNIST from {folder}")
    train_x, train_y, val_x, val_y = (read_idx(p) for p in paths)
    if len(train_x) != len(train_y) or len(val_x) != len(val_y) or train_x.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST files in {folder} do not match each other (images {train_x.shape}, "
                        f"labels {train_y.shape}): replace them")
    pad = lambda x: torch.from_numpy(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None].copy())  # (N, 1, 32, 32)
    return ImageData(pad(train_x), torch.from_numpy(train_y.astype(np.int64)),
                     pad(val_x), torch.from_numpy(val_y.astype(np.int64)), FASHION_CLASSES, flip=False)


def _ignore_ctrl_c():
    """The decoding workers leave Ctrl-C to the main process, which ends the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode(job):
    """One image file -> centre-cropped, resized uint8 (S, S, 3), or None if it cannot be decoded
    (whatever the reason: an error inside a decoding worker must not reach the pool)."""
    path, size = job
    from PIL import Image                                # Pillow comes with matplotlib
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * size, 2 * size))         # JPEG: decode at reduced scale, much faster
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    except Exception:
        return None


def decode_all(jobs):
    """Decodes (path, size) jobs in worker processes, in order; a worker that dies (killed, out of
    memory) is a one-line error, never a pool waiting for it forever."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pool = ProcessPoolExecutor(min(16, os.cpu_count() or 1), initializer=_ignore_ctrl_c)
    try:
        return list(tqdm(pool.map(_decode, jobs, chunksize=32), total=len(jobs), desc="decoding Sub-IN"))
    except BrokenProcessPool:                               # (an error inside _decode is a file it cannot read)
        raise UserError(f"a decoding worker died while decoding {len(jobs)} images (killed, or out of memory); "
                        f"run again, or free memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_subin(data_dir, num_classes, class_list, image_size, cache_dir):
    """An ImageNet subset ("Sub-IN") from ImageNet's train layout: one folder of images per
    class. Classes: the first num_classes in sorted order, or those listed in class_list.
    Every 50th image of a class (sorted by name) is held out, and the last one of a class with 2 to
    49 images. Decoded once, then cached in cache_dir. Every folder error is found before decoding."""
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} {not_a_folder(data_dir)}: point it at ImageNet's train folder "
                        f"(one subfolder per class)")
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    if class_list is not None:
        try:
            wanted = [line.strip() for line in Path(class_list).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --class-list {class_list}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"--class-list {class_list} is not a text file: write one class folder name per "
                            f"line") from None
        missing = [c for c in wanted if c not in folders]
        if not wanted:
            raise UserError(f"--class-list {class_list} names no classes: write one class folder name per line")
        if missing:
            raise UserError(f"--class-list names {len(missing)} classes with no folder in {data_dir}, "
                            f"e.g. {missing[0]}")
        classes = wanted
    else:
        if not folders:
            raise UserError(f"no class folders in {data_dir}: --data-dir must be ImageNet's train folder (one "
                            f"subfolder per class)")
        classes = folders[:num_classes]
    files = {c: sorted(p for p in (data_dir / c).iterdir() if p.suffix in IMAGE_SUFFIXES) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise UserError(f"class folder {data_dir / empty[0]} has no images ({len(empty)} such folders): remove them, "
                        f"or pick classes with --class-list")
    split = "held out: every 50th, or the last of a class with 2 to 49"  # in the key: another rule, another cache
    described = [str(data_dir.resolve()), classes, image_size, {c: len(f) for c, f in files.items()}, split]
    key = hashlib.md5(json.dumps(described).encode()).hexdigest()[:12]
    cache = cache_dir / f"subin-{len(classes)}cls-{image_size}px-{key}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                arrays = [z[k] for k in ("train_x", "train_y", "val_x", "val_y")]
        except Exception as e:
            raise UserError(f"cannot read the cached Sub-IN images {cache} ({e.__class__.__name__}): delete it and "
                            f"they are decoded again") from None
    else:
        jobs = [(str(p), image_size) for c in classes for p in files[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in files[c]], dtype=np.int64)
        held = np.array([j % 50 == 49 or (2 <= len(files[c]) < 50 and j == len(files[c]) - 1)
                         for c in classes for j in range(len(files[c]))], dtype=bool)
        check_fits(2 * len(jobs) * 3 * image_size ** 2, torch.device("cpu"), f"decoding {len(jobs)} images at "
                   f"{image_size} x {image_size}", "use a smaller --image-size or fewer classes")   # decoded, stacked
        check_writable(cache, "--cache-dir", folder=False)      # before the minutes of decoding, not after
        images = decode_all(jobs)
        ok = np.array([im is not None for im in images], dtype=bool)
        if (~ok).sum():
            print(f"skipped {(~ok).sum()} unreadable files of {len(jobs)} (e.g. {jobs[int(np.argmin(ok))][0]})")
        if not ok.any():
            raise UserError(f"no readable images in the {len(classes)} class folders of {data_dir}")
        x = np.stack([im for im in images if im is not None]).transpose(0, 3, 1, 2)  # (N, 3, S, S)
        labels, held = labels[ok], held[ok]
        if not held.any() or held.all():
            missing = "validation" if not held.any() else "training"
            raise UserError(f"the readable images of {data_dir} leave no {missing} "
                            f"image (every 50th image of a class is held out, or the last of a class with 2 to 49): "
                            f"add images or classes")
        arrays = [x[~held], labels[~held], x[held], labels[held]]
        with atomic_write(cache) as tmp:
            np.savez(tmp, train_x=arrays[0], train_y=arrays[1], val_x=arrays[2], val_y=arrays[3])
    return ImageData(*map(torch.from_numpy, arrays), classes, flip=True)


def make_synthetic(image_size, num_classes=10, n_train=5000, n_val=500):
    """Procedural class-conditional images, no files: class c is a colour grating at angle
    c * 180 / num_classes degrees, with random phase, frequency and brightness."""
    check_fits(SYNTHETIC_BYTES_PER_PIXEL * (n_train + n_val) * image_size ** 2, torch.device("cpu"),
               f"drawing {n_train + n_val} synthetic images at {image_size} x {image_size}",
               "use a smaller --image-size")
    rng = np.random.default_rng(0)                      # fixed: the same data in every run
    yy, xx = np.meshgrid(np.linspace(-1, 1, image_size), np.linspace(-1, 1, image_size), indexing="ij")
    hues = np.arange(num_classes) / num_classes
    palette = np.stack([np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], 1)                           # (K, 3)

    def draw(n):
        y = rng.integers(0, num_classes, n)
        angle = np.pi * y / num_classes
        freq = rng.uniform(2, 4, n) * np.pi
        phase = rng.uniform(0, 2 * np.pi, n)
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        wave = np.sin(freq[:, None, None] * (cos * xx + sin * yy) + phase[:, None, None])                    # (n, S, S)
        brightness = rng.uniform(0.6, 1.0, (n, 1, 1, 1))
        img = wave[:, None] * (0.5 + 0.5 * palette[y][:, :, None, None]) * brightness                    # (n, 3, S, S)
        return torch.from_numpy(((img + 1) * 127.5).clip(0, 255).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    (tx, ty), (vx, vy) = draw(n_train), draw(n_val)
    return ImageData(tx, ty, vx, vy, [f"class {c}" for c in range(num_classes)], flip=False)


def load_data(dataset, data_dir=None, image_size=32, num_classes=100, class_list=None, cache_dir="./data/cache",
              flip=True, probe=None):
    """One of DATASETS. data_dir None: the default places (./data; Debian's Fashion-MNIST folder).
    num_classes, class_list: Sub-IN's classes. flip=False turns off the random horizontal flips
    (on for cifar10 and subin). probe="copy": every image, training and held out, as copy_probe makes it."""
    folder, explicit = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir), data_dir is not None
    if dataset == "cifar10":
        data = load_cifar10(folder, explicit)
    elif dataset == "fashion-mnist":
        data = load_fashion_mnist(folder, explicit)
    elif dataset == "subin":
        data = load_subin(folder, num_classes, class_list, image_size, Path(cache_dir))
    else:
        data = make_synthetic(image_size)
    data.flip = data.flip and flip
    if probe == "copy":
        data.train_x, data.val_x = copy_probe(data.train_x), copy_probe(data.val_x)
    return data


def announce_sizes(data, val_size, batch_size):
    """A note when the held-out set or the training set is smaller than what a run asks of it."""
    if val_size > len(data.val_x):
        print(f"note: --val-size {val_size} is more than the {len(data.val_x)} held-out images: validating on all "
              f"of them")
    if batch_size > len(data.train_x):
        print(f"note: --batch-size {batch_size} is more than the {len(data.train_x)} training images: "
              f"each batch holds some images twice")


class Batches:
    """Batch for step s = a deterministic function of (seed, s): the data is read as an
    endless stream of epochs, each a fresh permutation. Resuming at step s therefore gives
    exactly the batches an uninterrupted run would have seen. Each rank takes its slice."""

    def __init__(self, data, batch_size, seed, rank=0, world=1, device="cpu"):
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)   # uint8 on the device (CIFAR-10: 150 MB)
        self.flip, self.batch, self.seed, self.rank, self.world = data.flip, batch_size, seed, rank, world
        self.perms = {}

    def perm(self, epoch):
        if epoch not in self.perms:
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 2}
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self.perms[epoch] = torch.randperm(len(self.x), generator=g)
        return self.perms[epoch]

    def get(self, step):
        n, per_rank = len(self.x), self.batch // self.world
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)[self.rank * per_rank:(self.rank + 1) * per_rank]
        e0, e1 = int(pos[0]) // n, int(pos[-1]) // n
        idx = torch.cat([self.perm(e) for e in range(e0, e1 + 1)])[pos - e0 * n]  # (b,) dataset indices
        x = to_float(self.x[idx.to(self.x.device)])  # (b, c, S, S) in [-1, 1]
        if self.flip:
            g = torch.Generator().manual_seed(self.seed * 100_003 + 7 * step + 1)
            flip = (torch.rand(self.batch, generator=g) < 0.5)[self.rank * per_rank:(self.rank + 1) * per_rank]
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x, self.y[idx.to(self.y.device)]


def run_data(args, data_dir=None):
    """The data a run trained on (args: a Run's arguments, at least its dataset): from data_dir if
    given, else where the run read it if that folder still exists, else the default places."""
    kept = vars(args)
    if data_dir is None and kept.get("data_dir") is not None and Path(kept["data_dir"]).is_dir():
        data_dir = kept["data_dir"]
    return load_data(args.dataset, data_dir, args.image_size, args.num_classes, kept.get("class_list"),
                     kept.get("cache_dir", "./data/cache"), probe=kept.get("probe"))


def held_out_image(data, index, name):
    """Held-out image `index` of data (named `name` in the error) in [-1, 1] (c, S, S), and its label."""
    if not 0 <= index < len(data.val_x):
        raise UserError(f"--index {index} is out of range: the {name} held-out set has images 0..{len(data.val_x) - 1}")
    return to_float(data.val_x[index]), int(data.val_y[index])
