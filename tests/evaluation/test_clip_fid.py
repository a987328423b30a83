"""CLIP-R precision on constructed similarity matrices, the CLIP backbones (random tiny and a local
directory), and FID against the Fréchet distance computed by hand from the same features."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from fast3d.evaluation.clip_metrics import backbone_name, clip_r_precision, load_clip, render_scores
from fast3d.evaluation.fid import FID, RandomTinyFeatures, load_fid_backbone, min_reference_images

# Tolerances, with their reasons.
FID_REL = 1e-6     # torchmetrics and scipy both in float64, different matrix square-root algorithms
FID_SELF = 1e-6    # a set against itself: the two square roots of one covariance cancel to rounding
EMBED_ATOL = 1e-5  # one float32 model run twice / saved and reloaded: identical up to kernel order


def test_clip_r_precision_on_a_constructed_similarity_matrix(gen):
    # 4 images, 3 prompts: image 0 and 1 retrieve their prompts, image 2 retrieves prompt 0 instead
    # of its own 2, image 3 ties between its prompt 1 and prompt 2 (a tie is a miss).
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.3, 0.8, 0.1],
                        [0.7, 0.1, 0.6],
                        [0.2, 0.5, 0.5]])
    truth = torch.tensor([0, 1, 2, 1])
    assert clip_r_precision(sim, truth).tolist() == [1.0, 1.0, 0.0, 0.0]
    # shuffling the prompt columns (and the truth with them) does not change the answer
    perm = torch.randperm(3, generator=gen)
    inv = torch.argsort(perm)
    assert clip_r_precision(sim[:, perm], inv[truth]).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2 prompts"):
        clip_r_precision(sim[:, :1], torch.zeros(4))
    with pytest.raises(ValueError, match="truth must index the 3 prompts"):
        clip_r_precision(sim, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match=r"sim must be \[N, P\] and truth \[N\]"):
        clip_r_precision(sim, truth[:3])


def test_random_tiny_clip_is_named_random_and_is_deterministic(gen):
    a, b = load_clip("random-tiny"), load_clip("random-tiny")
    assert a.name == "clip-random-tiny"
    imgs = torch.rand(3, 3, 40, 56, generator=gen)  # not square: resized and centre-cropped
    ea = a.embed_images(imgs)
    assert ea.shape == (3, 16) and torch.allclose(ea.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ea, b.embed_images(imgs), atol=EMBED_ATOL), "the same random weights every time"
    t = a.embed_texts(["a red chair", "a blue car"])
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])
    with pytest.raises(ValueError, match="non-empty list of str"):
        a.embed_texts("a red chair")


def test_clip_from_a_local_directory_and_its_report_name(tmp_path, gen):
    tiny = load_clip("random-tiny")
    tiny.model.save_pretrained(tmp_path / "clip")
    tiny.tokenizer.save_pretrained(tmp_path / "clip")
    local = load_clip(str(tmp_path / "clip"))
    assert local.name == "clip-vit-w32-p8-32", "an unknown shape is named by its numbers, not a real backbone's name"
    imgs = torch.rand(2, 3, 32, 32, generator=gen)
    assert torch.allclose(local.embed_images(imgs), tiny.embed_images(imgs), atol=EMBED_ATOL)
    assert torch.allclose(local.embed_texts(["a mug"]), tiny.embed_texts(["a mug"]), atol=EMBED_ATOL)
    def vision(w, p, s):
        return SimpleNamespace(hidden_size=w, patch_size=p, image_size=s)

    assert backbone_name(vision(1024, 14, 224)) == "clip-vit-l-14"
    assert backbone_name(vision(1664, 14, 224)) == "clip-vit-bigg-14"
    assert backbone_name(vision(1024, 14, 336)) == "clip-vit-l-14-336"
    with pytest.raises(ValueError, match="'/nonexistent/clip' is not a directory"):
        load_clip("/nonexistent/clip")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type is 't5'; expected 'clip'"):
        load_clip(str(tmp_path / "other"))


def _frechet(f1, f2):  # [N, D] x2 float64 numpy -> the Fréchet distance of two Gaussians fitted to them
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _features(images):  # [N, 3, H, W] in [0, 1] -> [N, 16] float64, as FID's pipeline makes them
    with torch.no_grad():
        return RandomTinyFeatures()(images.clamp(0, 1).mul(255).round().to(torch.uint8)).double().numpy()


def test_fid_matches_the_frechet_distance_by_hand_and_is_zero_for_one_set(gen):
    ref = torch.rand(40, 3, 24, 24, generator=gen)
    shifted = (ref * 0.5 + 0.5).clamp(0, 1)  # brighter, less contrast
    fid = FID(load_fid_backbone("random-tiny"))
    assert fid.name == "random-tiny-conv"
    fid.add(ref, real=True)
    fid.add(ref, real=False)
    assert abs(fid.compute()) < FID_SELF
    fid = FID(load_fid_backbone("random-tiny"))
    fid.add(ref[:25], real=True)
    fid.add(ref[25:], real=True)  # accumulates over batches
    fid.add(shifted, real=False)
    value = fid.compute()
    expected = _frechet(_features(ref), _features(shifted))
    assert value > 100 * FID_SELF and abs(value - expected) <= FID_REL * expected, (value, expected)


def test_fid_names_its_minimum_and_a_missing_backbone(gen):
    fid = FID(load_fid_backbone("random-tiny"))
    need = min_reference_images(fid.backbone)
    assert need == 17
    fid.add(torch.rand(need - 1, 3, 8, 8, generator=gen), real=True)
    fid.add(torch.rand(4, 3, 8, 8, generator=gen), real=False)
    with pytest.raises(ValueError, match="needs at least 17 reference images"):
        fid.compute()
    fid.add(torch.rand(1, 3, 8, 8, generator=gen), real=True)
    assert fid.compute() >= 0
    with pytest.raises(ValueError, match=r"fid backbone '/nonexistent/inception.pth' is not a file.*nothing is "
                                         r"downloaded"):
        load_fid_backbone("/nonexistent/inception.pth")


@pytest.mark.slow
def test_inception_backbone_loads_torchvision_weights_from_a_file(tmp_path, gen):
    """Random Inception-v3 weights in torchvision's layout (the real file cannot be downloaded
    here): loaded, 2048-d features, named inception-v3-torchvision; other weights are refused."""
    from torchvision.models import inception_v3

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pth")
    net = load_fid_backbone(str(tmp_path / "inc.pth"))
    assert net.name == "inception-v3-torchvision" and min_reference_images(net) == 2049
    feats = net(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=gen))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected Inception-v3 weights with a 1008-class .* got no fc.weight"):
        load_fid_backbone(str(tmp_path / "other.pth"))


class _NotAStateDict:  # pickled as code: torch.load(weights_only=True) must refuse it
    pass


@pytest.mark.slow
def test_fid_inception_backbone_is_torch_fidelitys_network(tmp_path, gen):
    """Random weights in the FID Inception's layout (1008 classes; the real
    pt_inception-2015-12-05 file cannot be downloaded here): loaded as ``inception-v3-fid``, and its
    features are exactly those of torch-fidelity's extractor given the same file (the network the
    papers' FIDs use, with its TensorFlow-1 resize). A pickle that is not plain tensors is refused."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchvision.models import inception_v3

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    path = str(tmp_path / "pt_inception.pth")
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008).state_dict(), path)
    net = load_fid_backbone(path)
    assert net.name == "inception-v3-fid" and min_reference_images(net) == 2049
    images = torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8, generator=gen)
    ref = FeatureExtractorInceptionV3("fid-ref", ["2048"], feature_extractor_weights_path=path)  # our own file
    with torch.no_grad():
        assert torch.equal(net(images), ref(images)[0])
    torch.save({"fc.weight": _NotAStateDict()}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="not a readable state dict"):
        load_fid_backbone(str(tmp_path / "code.pth"))


def test_render_scores_of_a_reconstruction(gen):
    """VFusion3D's scores: renders identical to the input view have image similarity 1; the text
    score is the mean cosine with the caption; no caption, no text score."""
    clip = load_clip("random-tiny")
    view = torch.rand(1, 3, 32, 32, generator=gen)
    same = render_scores([clip], view.expand(3, -1, -1, -1), view, "a red mug")
    assert abs(same["clip_image:clip-random-tiny"] - 1) < EMBED_ATOL
    t = clip.embed_texts(["a red mug"])[0]
    assert abs(same["clip_text:clip-random-tiny"] - float(clip.embed_images(view)[0] @ t)) < EMBED_ATOL
    other = render_scores([clip], torch.rand(2, 3, 32, 32, generator=gen), view, "")
    assert set(other) == {"clip_image:clip-random-tiny"} and other["clip_image:clip-random-tiny"] < 1 - EMBED_ATOL
