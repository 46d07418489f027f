"""Each encoder's training objective against a value computed by hand (numpy) or by a
reference implementation, on tiny inputs, with the settings its `cpu` preset uses."""
import numpy as np
import pytest
import torch

from training.encoders.registry import get_encoder


def _method(name: str, labels=("a", "b", "c")):
    encoder = get_encoder(name)
    preset = encoder.preset("cpu")
    return encoder.build_method(encoder.build_backbone(preset), preset, labels), preset


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis (the classes, or SPQ's codewords)."""
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def nt_xent(z0: np.ndarray, z1: np.ndarray, temperature: float) -> float:
    """SimCLR's NT-Xent: each of the 2N views against the other 2N-1, its twin positive."""
    z = _unit(np.concatenate([z0, z1]))
    n = len(z0)
    sims = z @ z.T / temperature
    np.fill_diagonal(sims, -np.inf)
    positives = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float(-_log_softmax(sims)[np.arange(2 * n), positives].mean())


RNG = np.random.default_rng(0)


def test_simclr_loss_is_nt_xent():
    method, preset = _method("simclr")
    z0, z1 = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    got = method.criterion(torch.from_numpy(z0), torch.from_numpy(z1)).item()
    assert got == pytest.approx(nt_xent(z0, z1, preset.options["temperature"]), rel=1e-5)


def test_nnclr_swaps_in_the_nearest_support_vector_then_nt_xent():
    method, preset = _method("nnclr")
    dim, size = preset.options["out_dim"], preset.options["queue_size"]
    support = _unit(RNG.standard_normal((size, dim))).astype(np.float32)
    method.support_set(torch.from_numpy(support), update=True)
    z = RNG.standard_normal((3, dim)).astype(np.float32)
    neighbours = method.support_set(torch.from_numpy(z), update=False).numpy()
    expected = support[np.argmax(_unit(z) @ support.T, axis=1)]
    np.testing.assert_allclose(neighbours, expected, atol=1e-6)
    p = RNG.standard_normal((3, dim)).astype(np.float32)
    got = method.criterion(torch.from_numpy(neighbours), torch.from_numpy(p)).item()
    assert got == pytest.approx(nt_xent(neighbours, p, preset.options["temperature"]), rel=1e-5)


def test_barlow_twins_loss_is_cross_correlation_to_identity():
    method, preset = _method("barlowtwins")
    a, b = RNG.standard_normal((2, 6, 4)).astype(np.float64)

    def standardise(z):  # batch norm without affine: biased variance, eps 1e-5
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)

    c = standardise(a).T @ standardise(b) / len(a)
    off = c - np.diag(np.diag(c))
    expected = ((np.diag(c) - 1) ** 2).sum() + preset.options["lambda_param"] * (off**2).sum()
    got = method.criterion(torch.from_numpy(a).float(), torch.from_numpy(b).float()).item()
    assert got == pytest.approx(expected, rel=1e-4)


def sinkhorn(scores: np.ndarray, iterations: int, epsilon: float) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp (Algorithm 1 of the paper): equal mass per prototype, one per sample."""
    q = np.exp(scores / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_swav_loss_predicts_the_other_crops_sinkhorn_codes():
    method, preset = _method("swav")
    o = preset.options
    high = [RNG.uniform(-1, 1, (4, 5)).astype(np.float32) for _ in range(2)]
    low = [RNG.uniform(-1, 1, (4, 5)).astype(np.float32) for _ in range(2)]
    crops = high + low
    expected = 0.0
    for i, h in enumerate(high):
        q = sinkhorn(h.astype(np.float64), o["sinkhorn_iterations"], o["sinkhorn_epsilon"])
        others = [z for v, z in enumerate(crops) if v != i]
        expected += sum(-(q * _log_softmax(z / o["temperature"])).sum(1).mean() for z in others) / len(others)
    expected /= len(high)
    got = method.criterion([torch.from_numpy(h) for h in high], [torch.from_numpy(z) for z in low]).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_dino_loss_is_cross_entropy_from_centred_sharpened_teacher():
    method, preset = _method("dino")
    o = preset.options
    teacher = [RNG.standard_normal((3, o["out_dim"])).astype(np.float32) for _ in range(2)]
    student = [RNG.standard_normal((3, o["out_dim"])).astype(np.float32) for _ in range(4)]
    expected, pairs = 0.0, 0
    for t, t_out in enumerate(teacher):
        p_t = np.exp(_log_softmax(t_out / o["teacher_temp"]))  # the centre starts at zero
        for s, s_out in enumerate(student):
            if s != t:
                expected += -(p_t * _log_softmax(s_out / 0.1)).sum(1).mean()
                pairs += 1
    got = method.criterion([torch.from_numpy(t) for t in teacher], [torch.from_numpy(s) for s in student],
                           teacher_temp=o["teacher_temp"]).item()
    assert got == pytest.approx(expected / pairs, rel=1e-4)


def test_dml_loss_is_multi_similarity_over_the_mined_hard_pairs():
    method, preset = _method("dml")
    o = preset.options
    emb = RNG.standard_normal((8, 6)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    sims = _unit(emb) @ _unit(emb).T
    losses = []
    for a in range(len(emb)):
        pos = (labels == labels[a]) & (np.arange(len(emb)) != a)
        neg = labels != labels[a]
        # The miner's hard pairs: positives below the hardest negative, negatives above the
        # hardest positive, each by epsilon.
        hard_pos = sims[a][pos][sims[a][pos] - o["epsilon"] < sims[a][neg].max()]
        hard_neg = sims[a][neg][sims[a][neg] + o["epsilon"] > sims[a][pos].min()]
        losses.append(np.log1p(np.exp(-o["alpha"] * (hard_pos - o["base"])).sum()) / o["alpha"]
                      + np.log1p(np.exp(o["beta"] * (hard_neg - o["base"])).sum()) / o["beta"])
    emb_t, labels_t = torch.from_numpy(emb), torch.from_numpy(labels)
    got = method.criterion(emb_t, labels_t, method.miner(emb_t, labels_t)).item()
    assert got == pytest.approx(np.mean(losses), rel=1e-4)


def test_clip_loss_equals_open_clip_with_one_image_per_class():
    from open_clip.loss import ClipLoss

    from training.encoders.clip import class_prompt_clip_loss

    images = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = torch.tensor([2, 0, 3, 1])
    scale = torch.tensor(10.0)
    reference = ClipLoss()(images, texts[labels], scale)
    assert class_prompt_clip_loss(images, texts, labels, scale).item() == pytest.approx(reference.item(), rel=1e-5)


def test_clip_loss_spreads_a_prompts_target_over_its_images():
    from training.encoders.clip import class_prompt_clip_loss

    images = _unit(RNG.standard_normal((5, 4)))
    texts = _unit(RNG.standard_normal((3, 4)))
    labels = np.array([0, 0, 1, 2, 2])
    logits = 5.0 * images @ texts.T
    image_loss = -_log_softmax(logits)[np.arange(5), labels].mean()
    text_log_p = _log_softmax(logits.T)
    text_loss = np.mean([-text_log_p[c][labels == c].mean() for c in range(3)])
    got = class_prompt_clip_loss(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(labels),
                                 torch.tensor(5.0, dtype=torch.float64)).item()
    assert got == pytest.approx((image_loss + text_loss) / 2, rel=1e-6)


def test_spq_loss_contrasts_each_view_with_the_other_views_soft_quantization():
    method, preset = _method("spq")
    o = preset.options
    m, _, sub = method.backbone.codebooks.shape
    xa, xb = RNG.standard_normal((2, 4, m * sub)).astype(np.float32)
    words = method.backbone.codebooks.detach().numpy()
    words = words / np.linalg.norm(words, axis=-1, keepdims=True)

    def sub_normalised(x):
        s = x.reshape(len(x), m, sub)
        return s / np.linalg.norm(s, axis=-1, keepdims=True)

    def soft_quantized(x):
        weights = np.exp(_log_softmax(o["tau_q"] * np.einsum("nmd,mkd->nmk", sub_normalised(x), words)))
        return np.einsum("nmk,mkd->nmd", weights, words).reshape(len(x), -1)

    expected = 0.5 * (nt_xent(sub_normalised(xa).reshape(4, -1), soft_quantized(xb), o["tau_cqc"])
                      + nt_xent(sub_normalised(xb).reshape(4, -1), soft_quantized(xa), o["tau_cqc"]))
    got = method.cross_quantized_loss(torch.from_numpy(xa), torch.from_numpy(xb)).item()
    assert got == pytest.approx(expected, rel=1e-4)
