import numpy as np
import pytest

from diffseg_utils.toy.world import (CATEGORIES, NUM_CLASSES, SEEN_CATEGORIES, SPLITS, UNSEEN_CATEGORIES, caption_for,
                                     render)


def test_deterministic_and_batch_independent():
    a = render("generator", 10, 6)
    b = render("generator", 10, 6)
    c = render("generator", 12, 2)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and a.captions == b.captions
    assert np.array_equal(a.images[2:4], c.images) and np.array_equal(a.labels[2:4], c.labels)
    assert not np.array_equal(render("fewshot_train", 0, 4).images, render("fewshot_test", 0, 4).images)


def test_labels_and_captions_agree():
    b = render("eval", 0, 64)
    assert b.images.shape == (64, 64, 64, 3) and b.images.dtype == np.uint8 and b.labels.shape == (64, 64, 64)
    assert b.labels.max() < NUM_CLASSES
    for lab, cls, cap in zip(b.labels, b.classes, b.captions):
        assert 1 <= len(cls) <= 3
        assert cap == caption_for([CATEGORIES[c - 1] for c in cls])
        for c in cls:
            assert (lab == c).sum() >= 20, "every captioned object is visible"
        present = set(np.unique(lab)) - {0}
        assert set(cls) <= present
        for c in present - set(cls):  # only slivers of hidden objects may be uncaptioned
            assert (lab == c).sum() < 20


def test_colour_does_not_decide_the_class():
    b = render("generator", 0, 400)
    means = []
    for c in range(1, NUM_CLASSES):
        m = b.labels == c
        means.append(b.images[m].mean(0))
    means = np.array(means)
    assert np.ptp(means, axis=0).max() < 40, "class-mean colours should be nearly equal (random colours)"


def test_splits_and_category_filter():
    assert set(SEEN_CATEGORIES) | set(UNSEEN_CATEGORIES) == set(CATEGORIES) and len(UNSEEN_CATEGORIES) == 3
    seen_ids = tuple(CATEGORIES.index(c) + 1 for c in SEEN_CATEGORIES)
    b = render("oracle", 0, 50, categories=seen_ids)
    assert all(c in seen_ids for cls in b.classes for c in cls)
    with pytest.raises(ValueError, match="unknown split"):
        render("nope", 0, 1)
    assert len(set(SPLITS.values())) == len(SPLITS)


def test_caption_format():
    assert caption_for(["star"]) == "a photo of a star"
    assert caption_for(["star", "ring"]) == "a photo of a star and a ring"
    assert caption_for(["star", "ring", "heart"]) == "a photo of a star, a ring and a heart"


def test_tokenizer_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from diffseg_utils.toy.tokenizer import WORDS, build_tokenizer

    build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1  # unknown words still tokenize
