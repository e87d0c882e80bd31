"""What the notebooks (``notebooks/0N_*.ipynb``) share, so that they stay thin and a script can
call the same functions.

* Runs: ``run_folder`` (``runs/<notebook>/<run>/``, fresh unless resumed), ``teacher_overrides``
  (notebook 03's teacher recipe; 04-06 reuse it when they have to train their own teacher, so
  their numbers are the same whether or not 03 ran first) and ``resolve_teacher`` (an explicit
  checkpoint, else 03's finished run, else none). ``snapshots``: a teacher run's models over
  training, step 0 included.
* The head on its own (01): ``colour_embedding``, ``head_objective``.
* The student (04, 05): ``slice_maps``, ``pca_rgb``, ``cpu_latency_ms``, ``load_decoder``,
  ``reconstruct``, ``colour_probe_r2``.
* Evaluation (06): ``scores_with_proxies``, ``proxy_picks``, ``explore`` (the pure function
  behind the interactive explorer) and ``explorer`` (the ipywidgets panel around it).
* Figures: ``show_images``, ``label_image``, ``plot_losses`` (matplotlib, imported lazily).
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import list_checkpoints, load_checkpoint
from .inference import predict_probs, to_tensor
from .metrics import proxy_scores, segmentation_scores
from .paths import REPO_ROOT, runs_dir
from .viz import colourize, match_labels

__all__ = [
    "TEACHER_NOTEBOOK",
    "PROXIES",
    "run_folder",
    "teacher_overrides",
    "resolve_teacher",
    "snapshots",
    "colour_embedding",
    "head_objective",
    "pca_rgb",
    "slice_maps",
    "cpu_latency_ms",
    "load_decoder",
    "reconstruct",
    "colour_probe_r2",
    "scores_with_proxies",
    "proxy_picks",
    "explore",
    "explorer",
    "label_image",
    "show_images",
    "plot_losses",
]

TEACHER_NOTEBOOK = "03_teacher_train"

# Label-free proxies of ``seglib.metrics.proxy_scores`` and whether a larger value is better.
PROXIES: dict[str, bool] = {"view_agreement": True, "utilization": True, "speckle": False, "boundary_density": False}


# ----------------------------------------------------------------------------------- runs


def run_folder(notebook: str, run_name: str, *, resume: bool = False) -> Path:
    """``runs/<notebook>/<run_name>/`` (created). Unless ``resume``, what an earlier run of the
    same name left there is removed first: a rerun starts from step 0 (reproducibly), and its
    TensorBoard curves are not drawn on top of the old ones."""
    path = runs_dir(notebook, run_name)
    if not resume and any(path.iterdir()):
        shutil.rmtree(path)
        path.mkdir(parents=True)
        print(f"cleared {path} (an earlier run of that name; resume=True continues it instead)")
    return path


def teacher_overrides(
    checkpoint_dir: str | Path,
    *,
    model: dict[str, Any],
    size: int,
    batch_size: int,
    steps: int,
    seed: int,
    device: str,
    threads: int,
    checkpoint_every: int,
) -> dict[str, Any]:
    """Config overrides of notebook 03's teacher run (``Config.from_dict`` takes them): the
    notebook's parameters on top of the package defaults, every checkpoint kept (they are the
    snapshots over training). 04-06 build their configs from the same function, so a teacher
    they train themselves is the one 03 trains, weight for weight."""
    return {
        "model": copy.deepcopy(model),
        "data": {"synthetic": True, "size": size, "batch_size": batch_size},
        "train": {
            "steps": steps,
            "seed": seed,
            "device": device,
            "threads": threads,
            "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_every": checkpoint_every,
            "image_every": checkpoint_every,
            "keep_checkpoints": 0,
        },
    }


def resolve_teacher(teacher_checkpoint: str = "", teacher_run: str = "") -> str:
    """The teacher checkpoint to start from: ``teacher_checkpoint`` when given (it must exist),
    else ``runs/03_teacher_train/<teacher_run>/teacher.pt`` when that run has finished, else ""
    (the caller trains a teacher itself). Prints which it is."""
    if teacher_checkpoint:
        path = Path(teacher_checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher_checkpoint not found: {path}; leave it empty to use notebook 03's run")
        print(f"teacher: {path} (the teacher_checkpoint parameter)")
        return str(path)
    if teacher_run:
        path = REPO_ROOT / "runs" / TEACHER_NOTEBOOK / teacher_run / "teacher.pt"  # (runs_dir would create it)
        if path.is_file():
            print(f"teacher: {path} (notebook 03's run '{teacher_run}')")
            return str(path)
    print(f"teacher: none found in runs/{TEACHER_NOTEBOOK}/{teacher_run or '<run>'}/; a teacher is trained first")
    return ""


def snapshots(run_dir: str | Path) -> list[tuple[int, torch.nn.Module]]:
    """(step, teacher) for step 0 (the run's initial weights) and every checkpoint of a teacher
    run folder, oldest first; all on CPU in eval mode."""
    from .models import random_init_like
    from .models.teacher import MonolithicSegmenter

    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no ckpt_*.pt in {run_dir}; train the teacher first (notebook 03)")
    models = [(step, MonolithicSegmenter.from_checkpoint(path)) for step, path in found]
    seed = load_checkpoint(found[0][1])["config"]["train"]["seed"]
    # run() seeds torch with train.seed right before building the model: the same draw.
    return [(0, random_init_like(models[0][1], seed=seed)), *models]


# ------------------------------------------------------------------------------ the head


def colour_embedding(rgb: np.ndarray, stride: int = 4) -> torch.Tensor:
    """(1, 3, H/stride, W/stride): the mean colour of each cell, standardised per channel over
    the image (zero mean, unit variance). What the head clusters when a model knows nothing but
    colour, at the scale of the model's unit-norm embeddings, so the head's default temperature
    means what it means in the model."""
    x = to_tensor(rgb)
    cells = F.adaptive_avg_pool2d(x, (x.shape[-2] // stride, x.shape[-1] // stride))  # (1, 3, h, w)
    return (cells - cells.mean((2, 3), keepdim=True)) / cells.std((2, 3), keepdim=True).clamp_min(1e-6)


def head_objective(emb: torch.Tensor, probs: torch.Tensor, prototypes: torch.Tensor) -> float:
    """Soft k-means objective: mean over positions of sum_k r[n, k] * ||x[n] - mu[k]||^2, for
    emb (B, D, h, w), probs (B, K, h, w) and prototypes (B, K, D)."""
    x = emb.flatten(2).transpose(1, 2).float()  # (B, N, D)
    d2 = torch.cdist(x, prototypes.float()).pow(2)  # (B, N, K)
    r = probs.flatten(2).transpose(1, 2)  # (B, N, K)
    return float((r * d2).sum(-1).mean())


# --------------------------------------------------------------------------- the student


def pca_rgb(z: torch.Tensor) -> np.ndarray:
    """An embedding (D, h, w) as a false-colour image (h, w, 3): its first three principal
    components, each scaled to [0, 1]."""
    d, h, w = z.shape
    x = z.reshape(d, h * w).T.double()  # (N, D)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    p = x @ v[:3].T  # (N, 3)
    lo, hi = p.min(0).values, p.max(0).values
    return ((p - lo) / (hi - lo).clamp_min(1e-12)).reshape(h, w, -1).float().numpy()


@torch.no_grad()
def slice_maps(student: torch.nn.Module, rgb: np.ndarray, k: int) -> dict[str, dict[str, np.ndarray]]:
    """For each slice of a ``StudentSegmenter`` (coarse stride 16, mid 8, fine 4): its embedding
    as a false-colour image (``pca``, at the slice's resolution) and the K clusters the head finds
    on that slice alone (``labels``, nearest-upsampled to the image). Only ``fine`` is used at
    inference."""
    from .models.segmenter import colour_channels

    x = to_tensor(rgb)
    out = {}
    for name, z in student.cnn(x).items():  # (1, E, H/s, W/s)
        colour = colour_channels(x, z.shape[-2:], student.colour_blur) * student.colour_weight
        emb = torch.cat([F.normalize(z, dim=1), colour], 1)  # what the head clusters
        probs = F.interpolate(student.head(emb, k).probs, size=x.shape[-2:], mode="nearest")  # (1, K, H, W)
        out[name] = {"pca": pca_rgb(z[0]), "labels": probs[0].argmax(0).numpy()}
    return out


@torch.no_grad()
def cpu_latency_ms(model: torch.nn.Module, rgb: np.ndarray, k: int, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one forward pass of ``model`` over ``rgb`` at ``k`` clusters."""
    x = to_tensor(rgb)
    for _ in range(warmup):
        model(x, k)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        model(x, k)
        times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def load_decoder(run_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """(decoder, its ``AutoencoderConfig``) from ``decoder_training_only.pt`` of a student run
    trained with the autoencoder loss; CPU, eval mode."""
    from .config import Config
    from .models.autoencoder import ReconstructionDecoder
    from .models.student import student_shape

    state = load_checkpoint(Path(run_dir) / "decoder_training_only.pt", kind="decoder")
    cfg = Config.from_dict(state["config"])
    dims, _ = student_shape(cfg.student)
    ae = cfg.autoencoder
    decoder = ReconstructionDecoder(in_channels=dims[2], hidden_channels=ae.hidden_channels, num_blocks=ae.num_blocks)
    decoder.load_state_dict(state["model"])
    return decoder.eval(), ae


@torch.no_grad()
def reconstruct(student: torch.nn.Module, decoder: torch.nn.Module, ae: Any, rgb: np.ndarray) -> dict[str, Any]:
    """The decoder's stride-4 RGB prediction for one image beside its training target (the image
    pooled to stride 4 and blurred), as (H/4, W/4, 3) arrays, and the reconstruction loss."""
    from .losses.recon import reconstruction_loss, reconstruction_target

    x = to_tensor(rgb)
    pred = decoder(student.cnn.forward_all(x)["fine_features"])  # (1, 3, H/4, W/4)
    target = reconstruction_target(x, sigma=ae.blur_sigma, kernel=ae.blur_kernel)
    return {
        "target": target[0].permute(1, 2, 0).clamp(0, 1).numpy(),
        "pred": pred[0].permute(1, 2, 0).numpy(),
        "loss": float(reconstruction_loss(pred, target, ae.grad_weight)),
    }


@torch.no_grad()
def colour_probe_r2(student: torch.nn.Module, images: Sequence[np.ndarray]) -> float:
    """How much of the stride-4 colour a linear map reads back from the student's learned fine
    embedding (unit-normalised, as the head sees it; without the appended colour channels): R^2
    of a least-squares fit pooled over all positions of ``images``. The autoencoder loss exists
    to keep this information in the student."""
    feats, colours = [], []
    for rgb in images:
        x = to_tensor(rgb)
        z = F.normalize(student.cnn(x)["fine"], dim=1)  # (1, E, h, w)
        feats.append(z[0].flatten(1).T)  # (N, E)
        colours.append(F.adaptive_avg_pool2d(x, z.shape[-2:])[0].flatten(1).T)  # (N, 3)
    a = torch.cat(feats).double()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)  # with an intercept
    y = torch.cat(colours).double()
    coef = torch.linalg.lstsq(a, y).solution
    residual = (y - a @ coef).pow(2).sum()
    return float(1 - residual / (y - y.mean(0)).pow(2).sum())


# ---------------------------------------------------------------------------- evaluation


def scores_with_proxies(
    model: torch.nn.Module,
    tiles: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    k: int | str = "present",
    ignore: Sequence[int] = (),
    **tags: Any,
) -> list[dict[str, Any]]:
    """One row per image: the model's Hungarian and many-to-one scores and the label-free
    proxies (``evaluate_tiles(..., proxies=True)``), with ``tags`` (e.g. ``step=100``) added."""
    from .evaluation import evaluate_tiles

    result = evaluate_tiles(model, tiles, k=k, ignore=ignore, proxies=True)
    return [{**tags, "image": entry["image"], "k": entry["k"], **entry["model"]} for entry in result["per_image"]]


def proxy_picks(rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Which value of ``by`` (``"step"``: a checkpoint, ``"k"``) ground truth and each proxy pick.

    ``rows`` come from ``scores_with_proxies``. Per criterion: ``pick``, the best value of the
    criterion's mean over images; ``miou_at_pick``, the mean Hungarian mIoU there; and
    ``per_image_hits``, the fraction of images whose own best value by the criterion is the one
    ground truth picks for that image. The first row is ground truth itself.
    """
    values = sorted({row[by] for row in rows})
    images = sorted({row["image"] for row in rows})
    table = {(row[by], row["image"]): row for row in rows}

    def best(key: str, image: str | None = None) -> Any:
        """The value of ``by`` with the best ``key``: for one image, or on the mean over images."""
        higher = key == "miou" or PROXIES[key]
        scores = {}
        for value in values:
            cells = [table[value, im][key] for im in images if (value, im) in table and image in (None, im)]
            if cells:
                scores[value] = float(np.mean(cells))
        return (max if higher else min)(scores, key=scores.get)

    def mean_miou(value: Any) -> float:
        return float(np.mean([table[value, im]["miou"] for im in images if (value, im) in table]))

    truth = {im: best("miou", im) for im in images}
    out = []
    for key in ["miou", *PROXIES]:
        if not all(key in row for row in rows):
            continue
        pick = best(key)
        out.append(
            {
                "criterion": "mIoU (ground truth)" if key == "miou" else key,
                "pick": pick,
                "miou_at_pick": mean_miou(pick),
                "per_image_hits": float(np.mean([best(key, im) == truth[im] for im in images])),
            }
        )
    return out


@torch.no_grad()
def explore(
    model: torch.nn.Module,
    rgb: np.ndarray,
    gt: np.ndarray | None = None,
    *,
    k: int,
    lane: str = "fast",
    temperature: float | None = None,
    ignore: Sequence[int] = (5, 255),
) -> dict[str, Any]:
    """Segment one image (H, W, 3) with the given knobs: the pure function behind notebook 06's
    explorer (same inputs, same outputs, nothing drawn).

    Returns ``labels`` (H, W), ``confidence`` (the top probability per pixel), the label-free
    proxies and, with ground truth ``gt``, its scores (``miou``, ``m2o_miou``, ...) and
    ``labels_matched`` (clusters renumbered to the classes they overlap most, for colours).
    """
    probs = predict_probs(model, to_tensor(rgb), k, lane=lane, temperature=temperature)[0].float().cpu()  # (K, H, W)
    labels = probs.argmax(0).numpy()
    out: dict[str, Any] = {"k": k, "lane": lane, "temperature": temperature, "labels": labels}
    out["confidence"] = probs.max(0).values.numpy()
    out.update(proxy_scores(labels, k))
    if gt is not None:
        out.update(segmentation_scores(labels, gt, ignore))
        out["labels_matched"] = match_labels(labels, gt, ignore)
    return out


def explorer(render: Callable[..., None], controls: dict[str, Any]):
    """An interactive panel: ``controls`` (name -> ipywidgets control) above an output area in
    which ``render(**values)`` redraws on every change. Returns the panel; display it.

    Nothing is drawn until a control changes: the notebook draws the first view with a plain
    ``render(...)`` call, so headless runs (papermill, nbval) never execute inside the widget's
    output area, whose capture protocol headless executors handle unreliably.
    """
    import ipywidgets as widgets

    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            render(**{name: control.value for name, control in controls.items()})

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


# ------------------------------------------------------------------------------- figures


def label_image(labels: np.ndarray, ignore: Sequence[int] = ()) -> np.ndarray:
    """Label map (H, W) -> uint8 RGB (H, W, 3) in the cluster palette; ``ignore`` ids in black."""
    out = colourize(labels)
    if len(ignore):
        out[np.isin(labels, list(ignore))] = 0
    return out


def show_images(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]] | Sequence[str] = (),
    *,
    size: float = 2.2,
    suptitle: str = "",
):
    """A grid of images (rows of (H, W, 3) arrays or (H, W) maps shown with a colour bar-free
    grey scale); ``titles`` per image, or per column for the first row only. Returns the figure."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(row):
                continue
            image = np.asarray(row[j])
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            title = ""
            if titles and isinstance(titles[0], str):
                title = titles[j] if i == 0 and j < len(titles) else ""
            elif titles and i < len(titles) and j < len(titles[i]):
                title = titles[i][j]
            ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_losses(history: dict[str, list[float]], keys: Sequence[str] | None = None, *, smooth: int = 10, ax=None):
    """Loss curves of a training history (``run`` returns it): each ``loss/<term>`` (or ``keys``)
    as a running mean over ``smooth`` steps, on a log scale when all values are positive."""
    import matplotlib.pyplot as plt

    steps = np.asarray(history["step"])
    # Terms logged only on some steps (e.g. ``loss/refine``, drawn with the learned lane) have
    # shorter lists without their steps: they are left out.
    keys = keys or [k for k in history if k.startswith("loss/") and k.count("/") == 1 and len(history[k]) == len(steps)]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    positive = True
    for key in keys:
        y = np.asarray(history[key], dtype=float)
        w = max(1, min(smooth, len(y)))
        y = np.convolve(y, np.ones(w) / w, mode="valid")
        positive &= bool((y > 0).all())
        ax.plot(steps[w - 1 :], y, label=key.removeprefix("loss/"), lw=2 if key == "loss/total" else 1)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncol=2)
    return ax
