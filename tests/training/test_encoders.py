"""Every registered encoder, through the same checks (timm-style parametrisation)."""
import pytest
import torch
from PIL import Image

from training.encoders.registry import EncoderSpec, get_encoder, list_encoders

ENCODERS = [e.name for e in list_encoders()]


@pytest.mark.parametrize("name", ENCODERS)
def test_backbone_gives_one_embedding_per_image(name):
    encoder = get_encoder(name)
    preset = encoder.preset("cpu")
    backbone = encoder.build_backbone(preset).eval()
    x = torch.randn(3, 3, preset.input_size, preset.input_size)
    with torch.no_grad():
        out = backbone(x)
    assert out.shape == (3, preset.embedding_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ENCODERS)
def test_spec_round_trips_through_json(name, tmp_path):
    spec = get_encoder(name).spec("cpu", labels=("a", "b"))
    path = tmp_path / "encoder.json"
    import json

    path.write_text(json.dumps(spec.to_dict()))
    assert EncoderSpec.load(path) == spec


@pytest.mark.parametrize("name", ENCODERS)
def test_training_loss_is_finite_and_reaches_the_backbone(name):
    encoder = get_encoder(name)
    preset = encoder.preset("cpu")
    torch.manual_seed(0)
    backbone = encoder.build_backbone(preset)
    method = encoder.build_method(backbone, preset, ("a", "b", "c"))
    image = Image.new("RGB", (96, 96), (200, 120, 170))
    transform = encoder.train_transform(preset)
    samples = [transform(image) for _ in range(4)]
    views = [torch.stack([s[v] for s in samples]) for v in range(len(samples[0]))]
    loss = method.loss(views, torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    method.after_step(0.5)


def test_unknown_encoder_and_preset_give_clear_errors():
    from histoseek.errors import HistoseekError

    with pytest.raises(HistoseekError, match="registered"):
        get_encoder("nope")
    with pytest.raises(HistoseekError, match="no preset"):
        get_encoder("dino").preset("huge")


def test_dino_teacher_follows_student_by_momentum():
    encoder = get_encoder("dino")
    preset = encoder.preset("cpu")
    method = encoder.build_method(encoder.build_backbone(preset), preset, ())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher_backbone.parameters()]
    method.after_step(0.0)  # momentum = base value at the start of training
    m = preset.options["momentum"]
    for old, new, student in zip(before, method.teacher_backbone.parameters(), method.backbone.parameters()):
        assert torch.allclose(new, m * old + (1 - m) * student, atol=1e-6)


def test_spq_fits_its_codebooks_to_the_training_descriptors_after_the_last_step():
    import faiss
    import numpy as np

    encoder = get_encoder("spq")
    preset = encoder.preset("cpu")
    backbone = encoder.build_backbone(preset)
    method = encoder.build_method(backbone, preset, ())
    m, k, d = backbone.codebooks.shape
    rng = np.random.default_rng(0)
    # 2,000 descriptors around 64 centres per sub-space, exported the way the model's are.
    centres = rng.standard_normal((m, 64, d))
    sub = centres[np.arange(m), rng.integers(0, 64, (2000, m))] + 0.05 * rng.standard_normal((2000, m, d))
    sub /= np.linalg.norm(sub, axis=-1, keepdims=True)
    descriptors = (sub / np.sqrt(m)).reshape(2000, -1).astype(np.float32)

    def mean_best_cosine(words: np.ndarray) -> float:
        words = words / np.linalg.norm(words, axis=-1, keepdims=True)
        return float(np.einsum("nmd,mkd->nmk", sub, words).max(-1).mean())

    before = mean_best_cosine(backbone.codebooks.detach().numpy())
    method.after_training(lambda: descriptors)
    after = mean_best_cosine(backbone.codebooks.detach().numpy())
    pq = faiss.ProductQuantizer(m * d, m, 8)
    pq.train(descriptors)  # k-means PQ fitted afterwards: the bar the learnt codes must clear
    k_means = mean_best_cosine(faiss.vector_to_array(pq.centroids).reshape(m, k, d))
    assert before < 0.5 < k_means - 0.01 <= after


def test_spq_bits_set_the_number_of_codebooks_and_travel_with_the_spec(synth_data, tmp_path):
    from histoseek.errors import HistoseekError
    from training import checkpoint
    from training.train import TrainConfig, train

    encoder = get_encoder("spq")
    assert [encoder.build_backbone(encoder.preset("cpu", {"bits": b})).codebooks.shape[0] for b in (16, 32, 64)] \
        == [2, 4, 8]
    with pytest.raises(HistoseekError, match="16, 32, 64"):
        encoder.build_backbone(encoder.preset("cpu", {"bits": 24}))
    with pytest.raises(HistoseekError, match="no option bits"):
        get_encoder("simclr").preset("cpu", {"bits": 16})
    out = train(TrainConfig(encoder="spq", data=str(synth_data), out=str(tmp_path / "spq16"), epochs=1,
                            batch_size=8, workers=0, bits=16))
    backbone, spec = checkpoint.load_backbone(out)
    assert spec.options["bits"] == 16 and backbone.codebooks.shape == (2, 256, 64)
    exported = backbone.normalise_output(backbone(torch.randn(2, 3, 64, 64)))
    # Unit-norm overall, each of the 2 sub-vectors of norm 1/sqrt(2).
    assert torch.allclose(exported.reshape(2, 2, 64).norm(dim=-1), torch.full((2, 2), 2 ** -0.5), atol=1e-5)
