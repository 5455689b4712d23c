"""The faces world: deterministic, batch-independent, every part present, exact labels."""
import numpy as np
import pytest

from diffseg_utils.toy.faces import NUM_CLASSES, PARTS, render_faces


def test_deterministic_and_independent_of_batching():
    a = render_faces("fewshot_train", 0, 12)
    b = render_faces("fewshot_train", 5, 3)
    np.testing.assert_array_equal(a.images[5:8], b.images)
    np.testing.assert_array_equal(a.labels[5:8], b.labels)
    c = render_faces("fewshot_train", 0, 12)
    np.testing.assert_array_equal(a.images, c.images)
    assert a.images.shape == (12, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.labels.shape == (12, 64, 64) and a.labels.dtype == np.uint8


def test_splits_differ_and_do_not_share_the_shapes_stream():
    from diffseg_utils.toy.world import render

    a, b = render_faces("fewshot_train", 0, 4), render_faces("fewshot_test", 0, 4)
    assert not np.array_equal(a.images, b.images)
    # the faces draw from their own random streams, so background textures differ from the shapes'
    assert not np.array_equal(a.images[0, :4, :4], render("fewshot_train", 0, 1).images[0, :4, :4])


def test_every_part_class_occurs_and_main_parts_are_large_enough():
    b = render_faces("generator", 0, 200)
    counts = np.bincount(b.labels.ravel(), minlength=NUM_CLASSES)
    assert len(PARTS) >= 8 and NUM_CLASSES == len(PARTS) + 1
    assert (counts > 0).all(), dict(zip(("background",) + PARTS, counts))
    assert b.labels.max() < NUM_CLASSES
    # eyes and mouth span several pixels in every face (a probe at 16x16 sees them)
    for part in ("left eye", "right eye", "mouth", "nose"):
        area = (b.labels == PARTS.index(part) + 1).sum((1, 2))
        assert np.median(area) >= 12, (part, np.median(area))
    # glasses on about a third of the faces; all four hair styles drawn
    glasses = np.mean([p["glasses"] for p in b.params])
    assert 0.2 < glasses < 0.45
    assert {p["hair"] for p in b.params} == {"none", "short", "long", "fringe"}


def test_left_eye_is_left_of_right_eye():
    b = render_faces("eval", 0, 50)
    xs = np.arange(64)
    for lab in b.labels:
        le, re = lab == PARTS.index("left eye") + 1, lab == PARTS.index("right eye") + 1
        if le.sum() and re.sum():
            assert (le.sum(0) * xs).sum() / le.sum() < (re.sum(0) * xs).sum() / re.sum()


def test_colour_does_not_tell_the_part():
    """Skin colour varies over the whole range: a colour threshold cannot find the face."""
    b = render_faces("generator", 0, 300)
    skin = np.stack([b.images[i][b.labels[i] == 1].mean(0) for i in range(len(b))])
    assert skin.std(0).min() > 50  # uint8 units, per channel, across faces


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        render_faces("nope", 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        render_faces("eval", -1, 1)
    with pytest.raises(ValueError, match="size"):
        render_faces("eval", 0, 1, size=8)
    assert len(render_faces("eval", 0, 0)) == 0
