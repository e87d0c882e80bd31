"""The teacher's forward contract, the soft k-means head and the refinement lanes."""

import numpy as np
import pytest
import torch

from seglib import MonolithicSegmenter
from seglib.config import ModelConfig
from seglib.kernels.kmeans import farthest_point_init
from seglib.models.head import SoftKMeans, soft_kmeans
from seglib.models.refine import LearnedRefiner, box_filter, fast_lane


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MonolithicSegmenter().eval()


def test_forward_contract(model):
    rgb = torch.rand(2, 3, 64, 48)
    out = model(rgb, 5)
    assert out["probs"].shape == (2, 5, 64, 48)
    assert out["embeddings"].shape == (2, model.embed_dim, 16, 12)
    assert out["prototypes"].shape == (2, 5, model.embed_dim)
    assert out["logits"].shape == (2, 5, 16, 12)
    assert torch.allclose(out["probs"].sum(1), torch.ones(2, 64, 48), atol=1e-5)
    assert (out["probs"] >= 0).all()


@pytest.mark.parametrize("lane", ["fast", "learned", "none"])
@pytest.mark.parametrize("downsample", [1, 2])
def test_lanes_and_downsample_keep_input_resolution(model, lane, downsample):
    out = model(torch.rand(1, 3, 32, 64), 3, lane=lane, downsample=downsample)
    assert out["probs"].shape == (1, 3, 32, 64)
    assert torch.allclose(out["probs"].sum(1), torch.ones(1, 32, 64), atol=1e-5)
    assert out["embeddings"].shape[-2:] == (32 // (4 * downsample), 64 // (4 * downsample))


@pytest.mark.parametrize("k", [0, 1, 17, 100, -3])
def test_k_out_of_range(model, k):
    with pytest.raises(ValueError, match=r"2\.\.16"):
        model(torch.rand(1, 3, 16, 16), k)


@pytest.mark.parametrize("k", [2.5, "4", None, True])
def test_k_not_integer(model, k):
    with pytest.raises(ValueError, match="integer"):
        model(torch.rand(1, 3, 16, 16), k)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.rand(1, 4, 16, 16), 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 3, 18, 16), 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        x = torch.rand(1, 3, 16, 16)
        x[0, 0, 0, 0] = float("nan")
        model(x, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.rand(1, 3, 16, 16) * 255, 3)
    with pytest.raises(ValueError, match="float"):
        model((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), 3)
    with pytest.raises(ValueError, match="unknown refinement lane"):
        model(torch.rand(1, 3, 16, 16), 3, lane="slow")


def test_gradients_flow_through_head_into_encoder():
    torch.manual_seed(0)
    m = MonolithicSegmenter()
    out = m(torch.rand(2, 3, 32, 32), 4, lane="none")
    # A loss on the probabilities only reaches the encoder through the soft k-means EM.
    (out["probs"] * torch.randn_like(out["probs"])).sum().backward()
    grads = [p.grad for p in m.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_learned_lane_works_for_every_k():
    refiner = LearnedRefiner()
    for k in (2, 7, 16):
        p = torch.softmax(torch.randn(1, k, 16, 16), 1)
        q = refiner(p, torch.rand(1, 3, 16, 16))
        assert q.shape == p.shape
        assert torch.allclose(q.sum(1), torch.ones(1, 16, 16), atol=1e-5)
        # The last conv starts at zero, so an untrained refiner returns its input.
        assert torch.allclose(q, p, atol=1e-4)


def test_head_recovers_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.arange(3).repeat_interleave(40)
    x = centres[labels] + 0.1 * torch.randn(120, 2)
    xd = x.T[None]  # (1, D, N)
    idx = farthest_point_init(xd, 3)
    out = soft_kmeans(xd, 3, iters=5, temperature=0.5, init=x[None, idx[0]])
    pred = out.probs[0].argmax(0)
    # Each true cluster maps to one predicted cluster.
    for c in range(3):
        assert pred[labels == c].unique().numel() == 1
    assert pred.unique().numel() == 3


def test_size_prior_gives_ambiguous_points_to_the_larger_cluster():
    """Two fixed prototypes at 0 and 1 on a line, 90 points at 0, 10 at 1, one at 0.5: without
    the prior the midpoint is a coin toss; with it, the offsets are size_prior * log(share) and
    the midpoint goes to the big cluster. Points near a prototype stay where they were."""
    x = torch.cat([torch.zeros(90), torch.ones(10), torch.tensor([0.5])])[None, None]  # (1, 1, 101)
    init = torch.tensor([[[0.0], [1.0]]])
    plain = soft_kmeans(x, 2, iters=0, temperature=0.1, init=init)
    prior = soft_kmeans(x, 2, iters=0, temperature=0.1, init=init, size_prior=3.0)
    assert plain.bias is None
    torch.testing.assert_close(plain.probs[0, :, -1], torch.tensor([0.5, 0.5]))
    share = plain.probs[0].mean(1)
    torch.testing.assert_close(prior.bias[0], 3.0 * (share + 1e-6).log())
    assert prior.probs[0, 0, -1] > 0.99  # 3 * log(0.9 / 0.1) = 6.6 nats for the big cluster
    assert torch.equal(prior.probs[0, :, :100].argmax(0), plain.probs[0, :, :100].argmax(0))
    # Given offsets are used as they are: the same assignment without measuring the shares.
    again = soft_kmeans(x[..., -1:], 2, iters=0, temperature=0.1, init=init, bias=prior.bias)
    torch.testing.assert_close(again.probs[0, :, 0], prior.probs[0, :, -1])


def test_head_group_shares_prototypes():
    head = SoftKMeans(iters=3)
    emb = torch.randn(4, 8, 6, 6)
    out = head(emb, 3, group=2)
    assert torch.equal(out.prototypes[0], out.prototypes[2])
    assert torch.equal(out.prototypes[1], out.prototypes[3])
    assert out.probs.shape == (4, 3, 6, 6)


@pytest.mark.parametrize("grad", [False, True])
def test_head_never_builds_b_k_d_n_tensor(grad):
    """The largest allocation stays far below a (B, K, D, N) tensor's size: at most a few
    (B, D, N) tensors (with gradient, the denoising's tile windows hold 4 * D * N numbers)."""
    head = SoftKMeans(iters=2)
    b, k, d, h, w = 1, 16, 128, 64, 64
    emb = torch.randn(b, d, h, w, requires_grad=grad)
    with (
        torch.set_grad_enabled(grad),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        head(emb, k)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < largest <= (4.5 if grad else 2) * b * d * h * w * 4 < b * k * d * h * w * 4 / 3


def test_fast_lane_at_the_probability_grid_matches_explicit_pooling():
    """guide_scale 4 on stride-4 probabilities filters at their own grid and upsamples."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 3, 8, 8), 1)
    rgb = torch.rand(1, 3, 32, 32)
    out = fast_lane(probs, rgb, guide_scale=4, smooth_iters=0)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out.sum(1), torch.ones(1, 32, 32), atol=1e-5)
    from seglib.models.refine import _apply, guided_filter_coefficients

    small = torch.nn.functional.avg_pool2d(rgb, 4)
    expected = _apply(guided_filter_coefficients(small, probs, 2, 1e-3), small)
    expected = torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)


def test_fast_lane_is_edge_aware_beats_box_filter():
    """Upsampling blocky probabilities of a step edge: the guided lane puts the boundary where
    the image edge is; a box filter of the same radius smears it."""
    h = w = 32
    rgb = torch.zeros(1, 3, h, w)
    rgb[..., :, 13:] = 1.0  # edge between columns 12 and 13 (not on the stride-4 grid)
    truth = (torch.arange(w) >= 13).float().expand(h, w)
    coarse = torch.nn.functional.avg_pool2d(torch.stack([1 - truth, truth])[None], 4)  # (1, 2, 8, 8)
    guided = fast_lane(coarse, rgb, radius=1, eps=1e-3, smooth_iters=0)
    box = box_filter(torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest"), 2)
    err_guided = (guided[0, 1] - truth).abs().mean()
    err_box = (box[0, 1] - truth).abs().mean()
    assert err_guided < 0.5 * err_box
    assert ((guided[0, 1] > 0.5).float() == truth).float().mean() == 1.0


def test_model_from_config_sizes():
    cfg = ModelConfig()
    cfg.encoder.width, cfg.encoder.embed_dim = 32, 8
    m = MonolithicSegmenter(cfg)
    assert m(torch.rand(1, 3, 16, 16), 2)["embeddings"].shape[1] == 8 + 3


# ------------------------------------------------------------------ feature denoising


def test_full_resolution_false_skips_only_the_lane(model):
    rgb = torch.rand(1, 3, 32, 32)
    full, coarse = model(rgb, 4), model(rgb, 4, full_resolution=False)
    assert "probs" not in coarse and "probs" in full
    assert torch.equal(full["probs_coarse"], coarse["probs_coarse"])


def test_kept_clustered_embeddings_and_low_resolution_probs_give_the_forward_results():
    """``predict(clustered=)`` with embeddings from ``clustered_embeddings`` equals the call
    that encodes the image itself; ``fit_clusters`` fits the same clusters from them; and
    ``upsample=False`` returns the fast lane's maps before their last bilinear step."""
    import torch.nn.functional as F

    import seglib

    model = seglib.load_model()  # the bundled student: fast lane, guide_scale 4, downsample 2
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        kept = model.clustered_embeddings(rgb)
        clusters = model.fit_clusters(rgb, 4)
        again = model.fit_clusters(rgb, 4, clustered=kept)
        assert torch.equal(clusters.prototypes, again.prototypes) and torch.equal(clusters.bias, again.bias)
        own = {"lane": None, "downsample": None, "iters": None, "temperature": None, "size_prior": None}
        full = model.predict(rgb, 4, **own, clusters=clusters)
        reused = model.predict(rgb, 4, **own, clusters=clusters, clustered=kept)
        assert torch.equal(full["clustered"], kept) and reused["features"] is None
        assert torch.equal(full["probs"], reused["probs"])
        low = model.predict(rgb, 4, **own, clusters=clusters, upsample=False)["probs"]
        assert low.shape == (2, 4, 32, 24)
        assert torch.equal(F.interpolate(low, size=(128, 96), mode="bilinear", align_corners=False), full["probs"])
        with pytest.raises(ValueError, match="clusters"):
            model.predict(rgb, 4, **own, clustered=kept)
        # The Predictor's window call is this assignment.
        window = seglib.Predictor(model, 4, clusters=clusters).window(rgb[:1], clustered=kept[:1])
        torch.testing.assert_close(window, reused["probs"][:1], atol=1e-6, rtol=0)


def test_learned_lane_runs_at_half_resolution_and_upsamples():
    cfg = ModelConfig()
    cfg.encoder.width, cfg.encoder.depth, cfg.encoder.embed_dim = 16, 1, 8
    torch.manual_seed(0)
    model = MonolithicSegmenter(cfg).eval()
    rgb = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full = model(rgb, 4, lane="learned")
    train = model(rgb, 4, lane="learned", full_resolution=False)
    assert full["probs"].shape[-2:] == (64, 64) and train["probs_learned"].shape[-2:] == (32, 32)
    assert torch.allclose(full["probs"].sum(1), torch.ones(1, 64, 64), atol=1e-5)
    upsampled = torch.nn.functional.interpolate(
        train["probs_learned"].detach(), size=(64, 64), mode="bilinear", align_corners=False
    )
    assert torch.allclose(full["probs"], upsampled, atol=1e-4)


def test_k_is_checked_once_on_its_way_from_segment_to_the_head(monkeypatch):
    """``seglib.segment``'s K is checked by the ``Predictor`` alone, also on the windowed path
    (fit and assignment), and a bad K fails there before any model work."""
    import seglib
    import seglib.inference.predictor as predictor_module
    import seglib.models.segmenter as segmenter_module
    from seglib.config import check_k

    calls = []

    def counting(k):
        calls.append(k)
        return check_k(k)

    monkeypatch.setattr(predictor_module, "check_k", counting)
    monkeypatch.setattr(segmenter_module, "check_k", counting)
    model = seglib.load_model()
    image = np.random.default_rng(0).integers(0, 256, (160, 224, 3), dtype=np.uint8)
    labels = seglib.segment(image, np.int64(5), model, tile=128, overlap=32)  # windows: fit, then assign
    assert labels.shape == image.shape[:2] and set(np.unique(labels)) <= set(range(5))
    assert calls == [5]
    for bad in (1, 17, 5.0, True):
        with pytest.raises(ValueError, match="K must be"):
            seglib.segment(image, bad, model, tile=128, overlap=32)
