"""Each fused kernel (``seglib.kernels``) against its reference formulation: the tiled
denoising, the EM steps' own backward, the farthest-point search, the pooling shortcuts, the
inference numerics, the flat-buffer AdamW, and one whole training step fused vs reference
(docs/performance.md)."""

import pytest
import torch
import torch.nn.functional as F

from seglib.augment import make_views_batched
from seglib.config import Config
from seglib.data.batches import step_generator
from seglib.kernels.bilateral import _neighbour_dots, denoise
from seglib.kernels.kmeans import _EMSteps, distance_logits, farthest_point_init, squared_norms
from seglib.kernels.numerics import inference_numerics, reference_ops, use_reference_ops
from seglib.kernels.pooling import box_mean, cell_means, mean_pool
from seglib.models.head import soft_kmeans
from seglib.models.refine import box_filter
from seglib.models.teacher import MonolithicSegmenter
from seglib.training.teacher import Knobs, TeacherTask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MonolithicSegmenter().eval()


def _one_step(task, model, views, transform, knobs, reference):
    """Losses and gradients of one training step on fixed views."""
    model.zero_grad(set_to_none=True)
    with reference_ops(reference):
        _, terms = task.losses(model, views, transform, knobs)
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


def test_reference_ops_keep_inference_numerics_off_only_with_gradient():
    assert inference_numerics() and not use_reference_ops()
    with reference_ops():
        assert use_reference_ops() and not inference_numerics()
        with torch.no_grad():
            assert inference_numerics()  # inference always uses the fast formulations
    assert not use_reference_ops()


# ------------------------------------------------------------------ denoising, pooling, init


def test_fused_farthest_point_init_picks_the_same_points():
    """The training path (distances via vector_norm, points read with a flat take) picks what
    the plain loop picks, for several images at once and for a non-contiguous x."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, 5)[..., :4].transpose(1, 2)  # (B=3, D=4, N=64), strided
    assert not x.is_contiguous()
    for k in (1, 2, 7):
        plain, fused = farthest_point_init(x, k), farthest_point_init(x, k, fused=True)
        assert fused.shape == (3, k)
        assert torch.equal(plain, fused)
        assert all(row.unique().numel() == k for row in fused)  # K distinct points per image


def _plain_farthest_points(x, k):
    """The farthest-point loop as the head ran it before it reused one buffer."""
    nearest, picks = (x - x.mean(2, keepdim=True)).square().sum(1), []
    for j in range(k):
        picks.append(nearest.argmax(1))
        chosen = torch.gather(x, 2, picks[-1].view(x.shape[0], 1, 1).expand(-1, x.shape[1], 1))
        dist = (x - chosen).square().sum(1)
        nearest = dist if j == 0 else torch.minimum(nearest, dist)
    return torch.stack(picks, 1)


@pytest.mark.parametrize("n", [4000, 65537, 200003])
def test_large_fits_working_in_place_give_the_plain_numbers(n):
    """A shared legend's fit (2^17 cells) computes the squared norms piece by piece, the logits
    in their own result and the farthest points in one buffer, to hold fewer copies of the cells:
    the same numbers, bit for bit, as the plain formulas (pieces of equal length: a short last
    piece would be reduced by another kernel), ties in the farthest points included."""
    g = torch.Generator().manual_seed(n)
    for b, d, k in ((1, 35, 6), (2, 19, 2), (1, 3, 16)):
        x = torch.randn(b, d, n, generator=g) * torch.rand(b, d, 1, generator=g) * 2
        x[:, :, : n // 3] += 1.5
        with torch.no_grad():
            x2 = squared_norms(x)
            assert torch.equal(x2, x.square().sum(1, keepdim=True))
            mu = x[:, :, torch.randperm(n, generator=g)[:k]].transpose(1, 2).contiguous()
            plain = -(x2 - 2 * torch.bmm(mu, x) + mu.square().sum(-1, keepdim=True)).clamp_min(0) / 0.1
            assert torch.equal(distance_logits(x, x2, mu, 0.1), plain)
            tied = (x * 2).round() / 2  # many equal distances: argmax must break ties alike
            assert torch.equal(farthest_point_init(tied, k), _plain_farthest_points(tied, k))
            fit = soft_kmeans(x, k, iters=2, temperature=0.1, init=mu, size_prior=1.0)
        with reference_ops(True):  # with gradient and the reference EM loop: the plain formulas themselves
            ref = soft_kmeans(x.clone().requires_grad_(), k, iters=2, temperature=0.1, init=mu, size_prior=1.0)
        for name in ("prototypes", "logits", "probs", "bias"):
            assert torch.equal(getattr(fit, name), getattr(ref, name).detach()), name


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_box_means_equal_the_plain_2d_pool(radius):
    """The separable box filters (lane: pools; high-pass input: convolutions) give the numbers
    of one 2D average pool that divides by the in-image count at the borders."""
    x = torch.rand(2, 5, 13, 22)
    plain = torch.nn.functional.avg_pool2d(x, 2 * radius + 1, 1, radius, count_include_pad=False)
    with reference_ops():  # the reference training formulation: the plain pool itself
        assert torch.equal(box_filter(x, radius), plain)
    with torch.no_grad():  # inference (and the fused training step): the separable pools
        assert torch.allclose(box_filter(x, radius), plain, atol=1e-6)
    assert torch.allclose(box_mean(x, radius), plain, atol=1e-6)


def test_inference_numerics_match_training_numerics(model):
    """Without gradient the segmenter uses faster formulations of the high-pass input, the
    normalisation, the denoising distances and the guided filter: same numbers to rounding as
    the reference formulations (``reference_ops``)."""
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        fast = model(rgb, 5)
    with reference_ops():
        exact = model(rgb, 5)  # gradient recorded: the reference training formulations
    for key in ("embeddings", "clustered", "probs_coarse", "probs"):
        assert torch.allclose(fast[key], exact[key].detach(), atol=1e-4), key
    assert not torch.equal(fast["probs"], exact["probs"].detach())  # the fast path did run


def test_denoise_smooths_within_regions_and_keeps_the_edge_between_them():
    torch.manual_seed(0)
    clean = torch.zeros(1, 4, 16, 16)
    clean[:, 0, :, 8:] = 3.0  # two regions, far apart in feature space
    noisy = clean + 0.1 * torch.randn_like(clean)
    out = denoise(noisy, iters=3, radius=2, bandwidth=0.4)
    assert (out - clean).square().mean() < 0.3 * (noisy - clean).square().mean()
    # no mixing across the edge: the columns next to it stay on their own side
    assert out[0, 0, :, 7].abs().max() < 0.3 and (out[0, 0, :, 8] - 3).abs().max() < 0.3
    constant = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(denoise(constant, iters=2, radius=1, bandwidth=0.4), constant)


def plain_bilateral(emb, spacings, radius, bandwidth):
    """The feature-space bilateral filter written plainly: pass i averages the (2r+1)^2
    neighbours ``spacings[i]`` cells apart (replicate padding), weighted by a softmax over minus
    squared feature distances / bandwidth^2, the weights without gradient."""
    h, w = emb.shape[-2:]
    for d in spacings:
        offsets = [(dy * d, dx * d) for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
        padded = F.pad(emb, (radius * d,) * 4, mode="replicate")
        shifted = [padded[:, :, dy : dy + h, dx : dx + w] for dy, dx in offsets]
        with torch.no_grad():
            d2 = torch.stack([(n - emb).square().sum(1) for n in shifted], 1)
            weights = torch.softmax(-d2 / bandwidth**2, 1)
        emb = sum(weights[:, i : i + 1] * n for i, n in enumerate(shifted))
    return emb


def test_denoise_gradient_matches_plain_autograd():
    """The hand-written backward of the weighted shifts equals autograd through slices."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    probe = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = denoise(a, iters=2, radius=2, bandwidth=0.7), plain_bilateral(b, [1, 1], 2, 0.7)
    (out_a * probe).sum().backward()
    (out_b * probe).sum().backward()
    assert torch.allclose(out_a, out_b) and torch.allclose(a.grad, b.grad)


def test_dilated_denoise_reaches_neighbours_at_its_spacing():
    """Dilation d samples neighbours d cells apart: with a huge bandwidth (plain averaging) an
    impulse spreads to cells 2 apart, not to the cells next to it; the schedule cycles."""
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    out = denoise(impulse, iters=1, radius=1, bandwidth=1e6, dilations=(2,))
    assert out[0, 0, 4, 6] > 0.1 and out[0, 0, 6, 6] > 0.1
    assert out[0, 0, 4, 5] == 0 and out[0, 0, 5, 5] == 0
    # (1, 2): the first pass spreads to the 3x3 block, the second by 2 more cells: reach 3.
    out = denoise(impulse, iters=2, radius=1, bandwidth=1e6, dilations=(1, 2))
    assert out[0, 0, 4, 7] > 0 and out[0, 0, 4, 8] == 0
    # Each pass is the plain bilateral filter at its spacing, the spacings cycling.
    x = torch.randn(1, 3, 11, 9, dtype=torch.float64)
    for dilations, spacings in [((1,), [1, 1, 1]), ((2,), [2, 2, 2]), ((1, 2), [1, 2, 1]), ((1, 2, 4), [1, 2, 4])]:
        out = denoise(x, iters=3, radius=1, bandwidth=0.8, dilations=dilations)
        assert torch.allclose(out, plain_bilateral(x, spacings, 1, 0.8)), dilations


def test_pooling_by_halving_gives_the_pools_block_means():
    """Without gradient, ``mean_pool``/``cell_means`` halve (powers of two dividing the sides)
    and otherwise fall back to the pools; with gradient they are the pools themselves; the
    channels-first box mean sums unfolded windows. Same numbers to rounding as the pools."""
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        for f in (2, 4, 8, 3):
            assert torch.allclose(mean_pool(x, f), F.avg_pool2d(x, f), atol=1e-6)
        assert torch.equal(mean_pool(x, 16), F.avg_pool2d(x, 16))  # 16 does not divide 40: the pool
        assert torch.allclose(cell_means(x, (6, 5)), F.adaptive_avg_pool2d(x, (6, 5)), atol=1e-6)
        assert torch.equal(cell_means(x, (7, 5)), F.adaptive_avg_pool2d(x, (7, 5)))  # no one factor
        assert torch.equal(cell_means(x, (48, 40)), x)
        # The guide of the fast lane pooled from its pooled image: the same operations.
        assert torch.equal(cell_means(mean_pool(x, 4), (6, 5)), mean_pool(x, 8))
        lum = torch.rand(2, 1, 30, 21)
        plain = F.avg_pool2d(lum, 9, 1, 4, count_include_pad=False)
        assert torch.allclose(box_mean(lum, 4), plain, atol=1e-6) and not torch.equal(box_mean(lum, 4), plain)
    assert torch.equal(mean_pool(x.requires_grad_(), 4), F.avg_pool2d(x, 4))


@pytest.mark.parametrize("radius,dilation", [(1, 1), (1, 4), (2, 2)])
def test_neighbour_dots_share_mirrored_offsets(radius, dilation):
    """One dot product per pair of opposite offsets: every offset's map as its own ``vecdot``."""
    emb = torch.randn(2, 7, 13, 17)
    reach = radius * dilation
    padded = F.pad(emb, (reach,) * 4, mode="replicate")
    centre = torch.linalg.vecdot(emb, emb, dim=1)
    offsets = [(dy * dilation, dx * dilation) for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    dots = _neighbour_dots(padded, centre, offsets, reach)
    assert set(dots) == set(offsets)
    for dy, dx in offsets:
        one = torch.linalg.vecdot(padded[:, :, dy : dy + 13, dx : dx + 17], emb, dim=1)
        assert torch.allclose(dots[(dy, dx)], one, atol=1e-5), (dy, dx)


# ------------------------------------------------------------------ the flat-buffer AdamW


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
    from seglib.kernels.adamw import FlatAdamW
    from seglib.training.optim import make_optimizer

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


def test_flat_adamw_skips_a_step_flagged_on_the_device():
    from seglib.training.optim import make_optimizer

    model = _two_part_model()
    opt = make_optimizer(model.named_parameters(), lr=0.05, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, torch.randn(8, 4), True).backward()
    opt.clip_grad_norm_(1.0)
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
