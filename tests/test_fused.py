"""The fused training step (docs/performance.md): the same losses and gradients as the eager
reference formulations (``reference_ops``), batched augmentation with the per-sample
properties the loop relies on (DDP slicing, resume), the device-side step skip, the benchmark's
profile and the compile fallback."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from seglib.augment import _rotate_hue, colour_jitter, make_views_batched, transforms_from_uniforms
from seglib.config import AugmentConfig, Config
from seglib.data.batches import step_generator
from seglib.models.head import _EMSteps, denoise
from seglib.models.layers import reference_ops
from seglib.models.teacher import MonolithicSegmenter
from seglib.training.teacher import Knobs, TeacherTask


def _one_step(task, model, views, transform, knobs, reference):
    """Losses and gradients of one training step on fixed views."""
    model.zero_grad(set_to_none=True)
    with reference_ops(reference):
        out = model(
            views,
            knobs.k,
            lane=knobs.lane,
            iters=knobs.iters,
            smooth_iters=knobs.smooth_iters,
            group=2,
            full_resolution=False,
        )
        terms = task.loss(out, views, transform, learned_channels=8, lane=knobs.lane)
        terms["total"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize("lane", ["fast", "learned"])
def test_fused_step_matches_the_reference_formulations(lane, one_thread):
    """Tiled denoising, the EM steps' own backward, the fast formulations and the half-
    resolution learned lane against the per-offset / per-step reference: losses and gradients
    of one step agree to 1e-4."""
    cfg = Config()
    cfg.model.encoder.width, cfg.model.encoder.depth, cfg.model.encoder.embed_dim = 16, 1, 8
    torch.manual_seed(0)
    task = TeacherTask(cfg, torch.device("cpu"))
    model = task.model.train()
    from seglib.data.synthetic import make_tile

    rgb = torch.stack([torch.from_numpy(make_tile(64, seed=i).rgb).permute(2, 0, 1) for i in range(2)])
    views, transform = make_views_batched(rgb, cfg.augment, step_generator(0, 7, 0))
    knobs = Knobs(k=8, downsample=1, iters=6, smooth_iters=1, lane=lane)
    fused_terms, fused_grads = _one_step(task, model, views, transform, knobs, reference=False)
    ref_terms, ref_grads = _one_step(task, model, views, transform, knobs, reference=True)
    assert fused_terms.keys() == ref_terms.keys() and ("refine" in ref_terms) == (lane == "learned")
    for name in ref_terms:
        assert torch.allclose(fused_terms[name], ref_terms[name], atol=1e-4, rtol=1e-4), name
    assert fused_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.allclose(fused_grads[name], ref_grads[name], atol=1e-4, rtol=1e-4), name
    assert any(g.abs().max() > 1e-3 for g in ref_grads.values())  # the comparison means something


@pytest.mark.parametrize(("shape", "radius", "dilations"), [((2, 5, 9, 11), 2, (1,)), ((1, 3, 13, 10), 1, (1, 2, 4))])
def test_tiled_denoise_matches_the_reference_loop(shape, radius, dilations):
    """Any map size (tiles padded and cropped) and neighbour spacing: the tiled passes give the
    reference loop's output and gradient (float64, so only the formulation could differ)."""
    torch.manual_seed(2)
    x = 0.3 * torch.randn(shape, dtype=torch.float64)
    probe = torch.randn(shape, dtype=torch.float64)
    results = []
    for reference in (False, True):
        a = x.clone().requires_grad_()
        with reference_ops(reference):
            out = denoise(a, iters=3, radius=radius, bandwidth=0.5, dilations=dilations)
        (out * probe).sum().backward()
        results.append((out.detach(), a.grad))
    (out_t, grad_t), (out_r, grad_r) = results
    assert torch.allclose(out_t, out_r, atol=1e-10) and torch.allclose(grad_t, grad_r, atol=1e-10)
    assert (out_r - x).abs().max() > 1e-2  # the filter did something


def test_em_steps_backward_equals_autograd_of_the_loop():
    """The hand-written backward of the EM iterations, including a cluster that loses all its
    mass and keeps its prototype, against autograd through the same iterations (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    mu0 = x[:, :, :4].transpose(1, 2).clone()
    mu0[:, 3] += 50.0  # far from every point: no mass
    probe = torch.randn(2, 4, 5, dtype=torch.float64)

    def loop(x, mu, iters=4, temperature=0.5):
        for _ in range(iters):
            r = ((2 * torch.bmm(mu, x) - mu.square().sum(-1, keepdim=True)) / temperature).softmax(1)
            mass = r.sum(2, keepdim=True)
            mu = torch.where(mass > 1e-6, torch.bmm(r, x.transpose(1, 2)) / mass.clamp_min(1e-6), mu)
        return mu

    grads = []
    for fn in (lambda a, m: _EMSteps.apply(a, m, 4, 0.5), loop):
        a, m = x.clone().requires_grad_(), mu0.clone().requires_grad_()
        out = fn(a, m)
        (out * probe).sum().backward()
        grads.append((out.detach(), a.grad, m.grad))
    for mine, theirs in zip(*grads, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-10)
    assert torch.equal(grads[0][0][:, 3], mu0[:, 3])  # the empty cluster kept its prototype


def test_batched_views_slice_like_one_process_and_repeat():
    """Each rank draws the global batch's numbers from the same generator and keeps its rows:
    two ranks of 2 produce exactly the views of one process at 4; the same key repeats."""
    cfg = AugmentConfig()
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    views, transform = make_views_batched(x, cfg, step_generator(3, 7, 5))
    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        part, part_t = make_views_batched(x[rows], cfg, step_generator(3, 7, 5), rows=rows, total=4)
        assert torch.equal(part[:2], views[:4][rows]) and torch.equal(part[2:], views[4:][rows])
        assert torch.equal(part_t.theta, transform.theta[rows])
    again, _ = make_views_batched(x, cfg, step_generator(3, 7, 5))
    other, _ = make_views_batched(x, cfg, step_generator(3, 7, 6))
    assert torch.equal(again, views) and not torch.equal(other, views)
    assert views.min() >= 0 and views.max() <= 1


def test_colour_jitter_is_the_per_image_jitter():
    """One 3x3 matrix and offset per image: the same result as brightness, contrast,
    saturation, hue rotation and noise applied one after the other, image by image."""
    cfg = AugmentConfig()
    torch.manual_seed(1)
    x, u, noise = torch.rand(3, 3, 16, 16), torch.rand(3, 4), torch.randn(3, 3, 16, 16)
    expected = []
    for img, uu, nn in zip(x, u, noise, strict=True):
        j = (2 * uu - 1).tolist()
        img = img + cfg.brightness * j[0]
        mean = img.mean()
        img = (img - mean) * (1 + cfg.contrast * j[1]) + mean
        grey = img.mean(0, keepdim=True)
        img = grey + (img - grey) * (1 + cfg.saturation * j[2])
        img = _rotate_hue(img, 2 * math.pi * cfg.hue * j[3]) + cfg.noise * nn
        expected.append(img.clamp(0, 1))
    assert torch.allclose(colour_jitter(x, u, cfg, noise), torch.stack(expected), atol=1e-5)


def test_transforms_from_uniforms_cover_the_eight_flips_and_turns_evenly():
    u = torch.rand(8000, 4, generator=torch.Generator().manual_seed(0))
    theta = transforms_from_uniforms(u, AugmentConfig(scale_min=0.7)).theta  # (N, 2, 3)
    scale = theta[:, :, :2].abs().amax((1, 2))  # a signed permutation times the crop scale
    assert scale.min() >= 0.7 - 1e-6 and scale.max() <= 1
    assert (theta[:, :, 2].abs() <= (1 - scale)[:, None] + 1e-6).all()  # the crop stays inside
    kinds, counts = torch.unique(torch.sign(theta[:, :, :2]).reshape(-1, 4), dim=0, return_counts=True)
    assert len(kinds) == 8 and counts.min() > 800  # 1000 expected each
    assert (
        torch.unique(
            torch.sign(transforms_from_uniforms(u, AugmentConfig(flip=False)).theta[:, :, :2]).reshape(-1, 4), dim=0
        ).shape[0]
        == 4
    )


def test_weight_average_skips_with_the_step():
    """A skipped step (flag on the device) leaves the average and its count alone; a kept one
    equals the plain update."""
    from seglib.training.loop import WeightAverage

    model = torch.nn.Linear(3, 2)
    a, b = WeightAverage(model, 0.9), WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = {k: v.clone() for k, v in a.state.items()}
    a.update(skip=torch.tensor(True))
    assert all(torch.equal(a.state[k], before[k]) for k in before) and int(a.updates) == 0
    a.update(skip=torch.tensor(False))
    b.update()
    assert all(torch.allclose(a.state[k], b.state[k]) for k in before) and a.state_dict()["updates"] == 1


def test_bench_profile_reports_per_step_counts(capsys, one_thread):
    from seglib.bench import main

    args = "--batch 1 --size 64 --k 4 --cluster-iters 2 --repeats 1 --warmup 1 --infer-size 64"
    assert main([*args.split(), "--profile", "--profile-steps", "1", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    prof = result["profile"]
    assert result["compile"] == "off" and prof["steps"] == 1
    assert 0 < prof["top_level_ops"] < prof["ops"] and prof["host_ms"] > 0 and prof["device_ms"] > 0


def test_bench_times_a_second_lane_in_turns(capsys, one_thread):
    from seglib.bench import main

    args = "--batch 1 --size 64 --k 4 --cluster-iters 2 --repeats 2 --warmup 1 --skip-infer --json --threads 1"
    assert main([*args.split(), "--lane", "fast", "--versus-lane", "learned"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lane"] == "fast" and result["versus_lane"] == "learned"
    ratio = result["train_step_s_versus"] / result["train_step_s"]
    assert result["lane_step_ratio"] == pytest.approx(ratio, abs=0.01) and ratio > 0


def test_compile_falls_back_to_eager_with_a_reason(capsys):
    from seglib.device import _CompiledOrEager, maybe_compile

    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, "") is model
    with pytest.raises(ValueError, match="train.compile"):
        maybe_compile(model, "fastest")

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    wrapped = _CompiledOrEager(model, broken, "default")
    x = torch.randn(1, 2)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    assert wrapped.failed == "RuntimeError: no C++ compiler found" and wrapped.weight is model.weight
    assert capsys.readouterr().err.count("running eager") == 1  # said once


def test_reference_ops_keep_inference_numerics_off_only_with_gradient():
    from seglib.models.layers import inference_numerics, use_reference_ops

    assert inference_numerics() and not use_reference_ops()
    with reference_ops():
        assert use_reference_ops() and not inference_numerics()
        with torch.no_grad():
            assert inference_numerics()  # inference always uses the fast formulations
    assert not use_reference_ops()


def test_learned_lane_runs_at_half_resolution_and_upsamples():
    cfg = Config().model
    cfg.encoder.width, cfg.encoder.depth, cfg.encoder.embed_dim = 16, 1, 8
    torch.manual_seed(0)
    model = MonolithicSegmenter(cfg).eval()
    rgb = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full = model(rgb, 4, lane="learned")
    train = model(rgb, 4, lane="learned", full_resolution=False)
    assert full["probs"].shape[-2:] == (64, 64) and train["probs_learned"].shape[-2:] == (32, 32)
    assert torch.allclose(full["probs"].sum(1), torch.ones(1, 64, 64), atol=1e-5)
    upsampled = F.interpolate(train["probs_learned"].detach(), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(full["probs"], upsampled, atol=1e-4)


def test_checkpoints_from_before_keep_a_full_resolution_learned_lane():
    """A checkpoint written before ``refine.learned_scale`` existed (the bundled student) loads
    with the learned lane at full resolution, as it was trained; new configs use half."""
    from seglib.checkpoint import load_checkpoint
    from seglib.config import upgrade_config
    from seglib.paths import BUNDLED_MODEL

    assert Config().model.refine.learned_scale == 2
    assert load_checkpoint(BUNDLED_MODEL)["config"]["model"]["refine"]["learned_scale"] == 1
    assert upgrade_config({"model": {"refine": {"learned_width": 8}}}) == {"model": {"refine": {"learned_width": 8}}}


def _two_part_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {"encoder": torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)), "refiner": torch.nn.Linear(3, 3)}
    )


def _loss(model, x, use_refiner):
    y = model["encoder"](x)
    return (model["refiner"](y) if use_refiner else y).square().mean() * 100


def test_flat_adamw_is_per_parameter_adamw_with_clipping():
    """Gathered into flat buffers, clipped and updated: the same weights, moments and step
    counts as torch's fused AdamW per parameter after clip_grad_norm_, over steps where the
    refiner sits out (no gradient: skipped, as torch skips such a parameter)."""
    from seglib.training.loop import FlatAdamW, make_optimizer

    flat_model, ref_model = _two_part_model(), _two_part_model()
    opt = make_optimizer(flat_model.named_parameters(), lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    assert isinstance(opt, FlatAdamW) and len(opt.param_groups[0]["params"]) == 2  # encoder, refiner
    x = torch.randn(8, 4)
    for step, use_refiner in enumerate([True, False, False, True, False]):
        for model, o in ((flat_model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=True)
            _loss(model, x, use_refiner).backward()
        norm = opt.clip_grad_norm_(0.5)
        assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5), rtol=1e-5)
        opt.step()
        ref.step()
        for (name, p), q in zip(flat_model.named_parameters(), ref_model.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), (step, name)
    assert float(opt.state[opt.param_groups[0]["params"][1]]["step"]) == 2  # the refiner's two steps
    # The parameters are views of the optimizer's buffers: the model sees every update.
    flat = opt.param_groups[0]["params"][0]
    assert flat_model["encoder"][0].weight.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_flat_adamw_resumes_a_per_parameter_optimizer_state():
    """A checkpoint's per-parameter AdamW state (before the flat buffers) loads, and the next
    steps equal those of the per-parameter optimizer it came from."""
    from seglib.training.loop import make_optimizer

    flat_model, ref_model = _two_part_model(), _two_part_model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    x = torch.randn(8, 4)
    for use_refiner in (True, False):
        ref.zero_grad(set_to_none=True)
        _loss(ref_model, x, use_refiner).backward()
        ref.step()
    flat_model.load_state_dict(ref_model.state_dict())
    opt = make_optimizer(flat_model.named_parameters(), lr=0.05, weight_decay=0.1)
    opt.load_state_dict(ref.state_dict())
    for model, o in ((flat_model, opt), (ref_model, ref)):
        o.zero_grad(set_to_none=True)
        _loss(model, x, True).backward()
        o.step()
    for p, q in zip(flat_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    assert sorted(float(s["step"]) for s in opt.state.values()) == [2.0, 3.0]


def test_flat_adamw_skips_a_step_flagged_on_the_device():
    from seglib.training.loop import make_optimizer

    model = _two_part_model()
    opt = make_optimizer(model.named_parameters(), lr=0.05, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, torch.randn(8, 4), True).backward()
    opt.clip_grad_norm_(1.0)
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
