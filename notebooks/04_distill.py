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

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import torch

from seglib.bench import cpu_latency_ms
from seglib.config import Config, merge
from seglib.data.synthetic import eval_set, make_tile
from seglib.device import resolve_device, set_threads
from seglib.diagnostics import slice_maps
from seglib.evaluation import evaluate_synthetic
from seglib.models.student import STUDENTS, StudentModelConfig, StudentSegmenter
from seglib.models.teacher import MonolithicSegmenter
from seglib.raster import predict_labels
from seglib.recipes import FAST_STUDENT
from seglib.runs import resolve_teacher, run_folder, teacher_recipe
from seglib.training.run import run
from seglib.viz import label_image, match_labels, plot_losses, show_images

# %% tags=["parameters"]
run_name = "ci"  # runs/04_distill/<run_name>/ holds student.pt, the checkpoints and the TensorBoard events
resume = False  # True: continue that run from its latest checkpoint; False: start it afresh
teacher_checkpoint = ""  # a teacher.pt to distil from; "": notebook 03's run, else a teacher trained first
teacher_run = "ci"  # the run of notebook 03 to take the teacher from
steps = 300  # student optimizer steps
student_size = "tiny"  # a name from seglib.models.student.STUDENTS (tiny | small | base)
eval_images = 8  # synthetic test tiles
eval_size = 128  # their side
eval_seed = 123  # the test set's seed
bench_size = 256  # tile side of the CPU latency measurement
bench_k = 8  # K of the latency measurement
bench_repeats = 5  # timed runs (the median is reported)
device = "cpu"  # cpu | cuda | auto (training and evaluation; the latency is always measured on CPU)
threads = 1  # torch CPU threads (0: torch's default)

# %% [markdown]
# ## The configuration
#
# Notebook 03's teacher recipe for its run `teacher_run` (`teacher_recipe`) with the student stage on top; everything
# else is the package default (`Config().distill`, `Config().autoencoder`, ...).

# %%
set_threads(threads)
run_dir = run_folder("04_distill", run_name, resume=resume)
teacher_path = resolve_teacher(teacher_checkpoint, teacher_run)
recipe = teacher_recipe(teacher_run, run_dir)
student_stage = {
    "stage": "student",
    "train": {"steps": steps, "checkpoint_every": steps, "image_every": steps, "device": device, "threads": threads},
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
# Quality on the seeded synthetic test set at K = classes present, beside RGB k-means. Speed is the median CPU time of
# one forward pass (K clusters, the fast lane) on a `bench_size` tile with this kernel's thread count. At the CI scale
# the teacher is deliberately narrow, so the speed of the package's default architectures is measured too (untrained
# weights: the time of a forward pass does not depend on them).

# %%
run_device = resolve_device(device)
teacher = MonolithicSegmenter.from_checkpoint(teacher_path)
student = StudentSegmenter.from_checkpoint(run_dir / "student.pt")
models = {"teacher": teacher, "student": student}
quality = {
    name: evaluate_synthetic(model.to(run_device), n=eval_images, size=eval_size, seed=eval_seed)
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
bench_tile = make_tile(bench_size, seed=99).rgb
print(f"CPU, {torch.get_num_threads()} thread(s), {bench_size}x{bench_size} tile, K={bench_k} (not regression-checked)")
for name, m in for_speed.items():
    ms = cpu_latency_ms(m.cpu().eval(), bench_tile, bench_k, repeats=bench_repeats)
    print(f"{name:<24} {ms:8.1f} ms   {sum(p.numel() for p in m.parameters()) / 1e6:6.2f} M parameters")

# %% [markdown]
# ## Summary (regression-checked)

# %%
# NBVAL_CHECK_OUTPUT
print(f"student '{student_size}': {params['student'] / 1e6:.2f} M parameters, teacher {params['teacher'] / 1e6:.2f} M")
for name, res in quality.items():
    print(f"{name:<12} mIoU {res['model']['miou']:.2f}   many-to-one {res['model']['m2o_miou']:.2f}")

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
tile = eval_set(1, eval_size, eval_seed)[0]
k = tile.n_classes
slices = slice_maps(student.cpu(), tile.rgb, k)
teacher_labels = match_labels(predict_labels(teacher.cpu(), tile.rgb, k), tile.labels)
student_labels = match_labels(predict_labels(student, tile.rgb, k), tile.labels)
show_images(
    [
        [tile.rgb, label_image(tile.labels), label_image(teacher_labels), label_image(student_labels)],
        [s["pca"] for s in slices.values()],
        [label_image(match_labels(s["labels"], tile.labels)) for s in slices.values()],
    ],
    [
        ["tile", f"ground truth (K={k})", "teacher", "student (fine, refined)"],
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
for t in eval_set(min(4, eval_images), eval_size, eval_seed):
    maps = [match_labels(predict_labels(m, t.rgb, t.n_classes), t.labels) for m in (teacher, student)]
    rows.append([t.rgb, label_image(t.labels), *[label_image(m) for m in maps]])
show_images(rows, ["tile", "ground truth", "teacher", "student"])
plt.show()

# %% [markdown]
# **Reading it.** At the CI scale (a 150-step narrow teacher, a few hundred student steps) the numbers are regression
# anchors rather than claims, and the student may even score above its teacher on eight tiles: it is wider than this
# teacher, and distillation smooths. Against the package's default teacher, the student's speed on a CPU is the point
# of distilling it. The real comparison is `params/04_distill/full.yaml`, run after 03's full run.
