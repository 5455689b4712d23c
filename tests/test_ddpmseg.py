"""FewShotSegmenter: the DDPM-Seg method end to end, at the user's image size."""
import torch


def test_fewshot_segmenter_returns_labels_at_a_non_square_input_size(ddpm_tiny):
    """Labels drawn at the user's (non-square) image size go in; labels at that size come out."""
    import numpy as np

    from diffseg_utils.ddpmseg import FewShotSegmenter
    from diffseg_utils.pixel_classifier import EnsembleConfig

    rng = np.random.default_rng(0)
    h, w = 24, 40
    imgs = rng.integers(0, 256, size=(2, h, w, 3), dtype=np.uint8)
    labels = np.zeros((2, h, w), np.int64)
    labels[:, :, w // 2:] = 1  # left half 0, right half 1
    blocks = [n for n in ddpm_tiny.blocks() if n.startswith("up_blocks")][:1]
    seg = FewShotSegmenter(ddpm_tiny, blocks, [10], 2, config=EnsembleConfig(num_classes=2, num_members=2, max_steps=30),
                           min_class_fraction=0)
    seg.fit(imgs, labels, progress=False)
    res = seg.predict(imgs)
    assert res.labels.shape == (2, h, w) and res.uncertainty.shape == (2, h, w)
    assert res.labels.dtype == torch.int64
