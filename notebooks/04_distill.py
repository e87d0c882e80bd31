# %% [markdown]
# # 04 · Distilling the student from the teacher
#
# **Question:** how much segmentation quality does the small multi-resolution student keep from its teacher, and how
# much faster is it on a CPU (where the QGIS plugin runs it)? The student is trained to reproduce the teacher's
# features, their geometry and its cluster assignments on three slices (stride 16, 8 and 4); only the fine slice is
# clustered at inference.
#
# **Which teacher.** `teacher_checkpoint` when given; otherwise the `teacher.pt` of notebook 03's run `teacher_run`
# (`runs/03_teacher_train/<teacher_run>/`) if it has finished; otherwise `run()` trains a teacher first, with the
# parameters of notebook 03's run `teacher_run` (`params/03_teacher_train/<teacher_run>.yaml`), into
# `runs/04_distill/<run_name>/teacher/`. The last two give the same teacher, weight for weight (same recipe, seed and
# thread count), so this notebook's numbers do not depend on whether 03 ran before it. The student trains on that
# run's data (tile size, batch, seed). The cell after the parameters says which teacher it is.
#
# **Your own imagery.** With `data_dir` (a folder of RGB tiles) the student is distilled on crops of those tiles (a
# teacher trained here first is trained on them too: 03's recipe with this `data_dir`) and both are scored on them:
# mIoU at K = the classes present with `mask_dir`, the label-free proxies at K = `k` without.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

from seglib.config import Config, merge
from seglib.data.synthetic import make_tile
from seglib.device import resolve_device, set_threads, training_threads
from seglib.evaluation.benchmarks import cpu_latency_ms
from seglib.evaluation.diagnostics import slice_maps
from seglib.evaluation.scores import evaluate_tiles, run_eval_tiles
from seglib.inference.predictor import Predictor
from seglib.models.student import STUDENTS, StudentModelConfig, StudentSegmenter
from seglib.models.teacher import MonolithicSegmenter
from seglib.parameters import check_parameters
from seglib.recipes import FAST_STUDENT, teacher_recipe
from seglib.runs import resolve_teacher, run_folder
from seglib.training.run import run
from seglib.viz import label_image, match_labels, plot_losses, show_images

# %% tags=["parameters"]
run_name = "ci"  # runs/04_distill/<run_name>/ holds student.pt, the checkpoints and the TensorBoard events
resume = False  # True: continue that run from its latest checkpoint; False: start it afresh
teacher_checkpoint = ""  # a teacher.pt to distil from; "": notebook 03's run, else a teacher trained first
teacher_run = "ci"  # the run of notebook 03 to take the teacher from
steps = 300  # student optimizer steps
data_dir = ""  # a folder of your own RGB tiles to distil on and evaluate on; "": teacher_run's data (ci: synthetic)
mask_dir = ""  # ground truth for data_dir's images (<stem>.png label maps), only ever scored; "": none
ignore = []  # mask ids left out of the scores, e.g. [5, 255] for the Dubai masks
k = 6  # segments per image where there are no masks (with masks or synthetic tiles: the classes present)
student_size = "tiny"  # a name from seglib.models.student.STUDENTS (tiny | small | base)
eval_images = 8  # synthetic test tiles, or images of data_dir evaluated (spread over the folder; 0: all)
eval_size = 128  # their side (folder images: their longer side after shrinking)
eval_seed = 123  # the test set's seed
bench_size = 256  # tile side of the CPU latency measurement
bench_k = 8  # K of the latency measurement
bench_repeats = 5  # timed runs (the median is reported)
device = "cpu"  # cpu | cuda | auto (training and evaluation; the latency is always measured on CPU)
threads = 1  # torch CPU threads (0: automatic, half the cores, as training picks them)

# %%
check_parameters()  # papermill only warns about a parameter this notebook does not declare: fail the run instead

# %% [markdown]
# ## The configuration
#
# Notebook 03's teacher recipe for its run `teacher_run` (`teacher_recipe`; its data replaced by `data_dir` when given)
# with the student stage on top; everything else is the package default (`Config().distill`, `Config().autoencoder`,
# ...).

# %%
set_threads(training_threads(threads, resolve_device(device)))  # 0: half the cores, as in training
run_dir = run_folder("04_distill", run_name, resume=resume)
teacher_path = resolve_teacher(teacher_checkpoint, teacher_run)
recipe = teacher_recipe(teacher_run, run_dir, data_dir=data_dir, mask_dir=mask_dir, ignore=ignore)
student_stage = {
    "stage": "student",
    "train": {"steps": steps, "checkpoint_every": steps, "device": device, "threads": threads},
    "student": {**FAST_STUDENT, "size": student_size},  # the shipped students' head
    "distill": {"teacher_checkpoint": teacher_path, "teacher_steps": recipe["train"]["steps"]},
}
cfg = Config.from_dict(merge(recipe, student_stage))
print(f"student: {cfg.student}")
print(f"distillation: {cfg.distill}")

# %% [markdown]
# ## Training
#
# The same `run()` as the command line (`python -m seglib.train --stage student ...`).

# %%
history = run(cfg, resume=resume)
teacher_path = teacher_path or str(run_dir / "teacher" / "teacher.pt")

# %% [markdown]
# ## Student against teacher
#
# Quality on the seeded synthetic test set (or `data_dir`'s images) at K = classes present, beside RGB k-means
# (without masks: the label-free proxies at K = `k`). Speed is the median CPU time of
# one forward pass (K clusters, the fast lane) on a `bench_size` tile with this kernel's thread count. At the CI scale
# the teacher is deliberately narrow, so the speed of the package's default architectures is measured too (untrained
# weights: the time of a forward pass does not depend on them).

# %%
run_device = resolve_device(device)
teacher = MonolithicSegmenter.from_checkpoint(teacher_path)
student = StudentSegmenter.from_checkpoint(run_dir / "student.pt")
models = {"teacher": teacher, "student": student}
# data_dir (or the folder of 03's run teacher_run), else the synthetic test set
names, tiles = run_eval_tiles(cfg.data, n=eval_images, size=eval_size, seed=eval_seed)
labelled = tiles[0][1] is not None
keys = ("miou", "m2o_miou") if labelled else ("view_agreement", "utilization")
quality = {
    name: evaluate_tiles(
        model.to(run_device), tiles, k="present" if labelled else k, ignore=ignore, seed=eval_seed, names=names
    )
    for name, model in models.items()
}
quality["rgb k-means"] = {"model": quality["teacher"]["rgb_kmeans"]}
params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
for_speed = {
    "this teacher": teacher,
    f"this student ({student_size})": student,
    "default teacher": MonolithicSegmenter(Config().model),
    **{
        f"default student ({name})": StudentSegmenter(
            StudentModelConfig.from_config(Config.from_dict({"student": {**FAST_STUDENT, "size": name}}))
        )
        for name in STUDENTS
    },
}
label = {"miou": "mIoU", "m2o_miou": "many-to-one", "view_agreement": "view agreement", "utilization": "utilization"}
for name, res in quality.items():
    print(f"{name:<12} " + "   ".join(f"{label[key]} {res['model'][key]:.3f}" for key in keys))
bench_tile = make_tile(bench_size, seed=99).rgb
print(f"CPU, {torch.get_num_threads()} thread(s), {bench_size}x{bench_size} tile, K={bench_k} (not regression-checked)")
for name, m in for_speed.items():
    ms = cpu_latency_ms(m.cpu().eval(), bench_tile, bench_k, repeats=bench_repeats)
    print(f"{name:<24} {ms:8.1f} ms   {sum(p.numel() for p in m.parameters()) / 1e6:6.2f} M parameters")

# %% [markdown]
# ## Summary (regression-checked)
#
# What nbval compares on every CPU: the sizes, RGB k-means, and the student's quality as properties with margins set
# by their spread across CPU kernels, threads and seeds (docs/testing.md); the trained numbers are printed above.

# %%
# NBVAL_CHECK_OUTPUT
print(f"student '{student_size}': {params['student'] / 1e6:.2f} M parameters, teacher {params['teacher'] / 1e6:.2f} M")
print("rgb k-means  " + "   ".join(f"{label[key]} {quality['rgb k-means']['model'][key]:.2f}" for key in keys))
if not data_dir:  # the margins hold for the synthetic test set, where they were measured
    teacher_miou, student_miou = (quality[name]["model"]["miou"] for name in ("teacher", "student"))
    kept, gain = student_miou / teacher_miou, student_miou - quality["rgb k-means"]["model"]["miou"]
    print(f"student keeps >= 89 % of its teacher's mIoU: {kept >= 0.89} (measured {kept:.1%})")
    print(f"student beats RGB k-means by >= 0.13 mIoU: {gain >= 0.13} (measured {gain:+.3f})")

# %% [markdown]
# ## Plots
#
# The distillation losses (each slice's weighted terms, their scale-neutral merge, the cross-resolution consistency
# and the autoencoder's reconstruction term):

# %%
keys = ["loss/total", "loss/coarse/total", "loss/mid/total", "loss/fine/total", "loss/consistency"]
plot_losses(history, keys + [k for k in ("loss/recon",) if k in history])
plt.title("student training losses")
plt.show()

# %% [markdown]
# ## The three slices
#
# The student's embeddings at stride 16 (coarse), 8 (mid) and 4 (fine), shown as false colour (their first three
# principal components) and clustered by the head on their own. Coarse slices see context and give blocky but
# coherent regions; the fine slice, the only one used at inference, keeps the boundaries.


# %%
def shown(labels, gt):
    """Labels in colour, renumbered to the classes they overlap most when there is ground truth."""
    return label_image(match_labels(labels, gt, ignore) if gt is not None else labels)


first = quality["teacher"]["per_image"][0]
rgb, gt = tiles[names.index(first["image"])]
h, w = (side // 16 * 16 for side in rgb.shape[:2])  # the slices are read on the student's 16 px grid
rgb, gt = rgb[:h, :w], (gt[:h, :w] if gt is not None else None)
slices = slice_maps(student.cpu(), rgb, first["k"])
truth = [label_image(gt, ignore)] if gt is not None else []
show_images(
    [
        [rgb, *truth, *[shown(Predictor(m.cpu(), first["k"]).labels(rgb), gt) for m in (teacher, student)]],
        [s["pca"] for s in slices.values()],
        [shown(s["labels"], gt) for s in slices.values()],
    ],
    [
        ["image", *[f"ground truth (K={first['k']})"] * len(truth), "teacher", "student (fine, refined)"],
        [f"{name} embedding (PCA)" for name in slices],
        [f"{name} clusters" for name in slices],
    ],
    size=2.6,
)
plt.show()

# %% [markdown]
# Teacher and student side by side on more test tiles:

# %%
rows = []
for entry in quality["teacher"]["per_image"][:4]:
    rgb, gt = tiles[names.index(entry["image"])]
    truth = [label_image(gt, ignore)] if gt is not None else []
    rows.append([rgb, *truth, *[shown(Predictor(m, entry["k"]).labels(rgb), gt) for m in (teacher, student)]])
show_images(rows, ["image", *["ground truth"] * len(truth), "teacher", "student"])
plt.show()

# %% [markdown]
# **Reading it.** At the CI scale (a 150-step narrow teacher, a few hundred student steps) the numbers move by a few
# hundredths between CPUs and seeds (docs/testing.md), and the student may even score above its teacher on eight
# tiles: it is wider than this teacher, and distillation smooths. Against the package's default teacher, the
# student's speed on a CPU is the point of distilling it. The real comparison is `params/04_distill/full.yaml`, run
# after 03's full run.
