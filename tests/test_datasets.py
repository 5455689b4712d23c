import numpy as np
import pytest

from diffseg_utils.datasets import (DDPMSEG_DATASETS, TOY_FEWSHOT_DIR, ignore_small_classes, load_split,
                                    write_split)
from diffseg_utils.toy.world import render


def test_shipped_toy_set_matches_the_world():
    tr = load_split(TOY_FEWSHOT_DIR, "train", num_classes=11)
    ref = render("fewshot_train", 0, 20)
    assert len(tr) == 20 and np.array_equal(tr.images, ref.images) and np.array_equal(tr.labels, ref.labels)
    assert len(load_split(TOY_FEWSHOT_DIR, "test")) == 20


def test_loader_errors(tmp_path):
    b = render("eval", 0, 2)
    write_split(tmp_path, "train", b.images, b.labels)
    with pytest.raises(ValueError, match="outside 0..2"):
        load_split(tmp_path, "train", num_classes=3)
    (tmp_path / "real" / "train" / "0001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="0001.npy missing"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="layout"):
        load_split(tmp_path, "test")


def test_small_class_rule_and_configs():
    lab = np.zeros((1, 10, 10), np.int64)
    lab[0, :2, :5] = 3  # 10 pixels < 20
    lab[0, 5:, :] = 4   # 50 pixels
    out = ignore_small_classes(lab)
    assert (out[0, :2, :5] == 255).all() and (out[0, 5:] == 4).all()
    assert DDPMSEG_DATASETS["bedroom_28"].num_classes == 28 and DDPMSEG_DATASETS["celeba_19"].test_images == 500
