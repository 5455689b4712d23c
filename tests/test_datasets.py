import json

import numpy as np
import pytest
from PIL import Image

from diffseg_utils.datasets import (DDPMSEG_DATASETS, DDPMSEG_DOWNLOAD_URL, DDPMSEG_ENV, TOY_FEWSHOT_DIR,
                                    VALIDATION_START, ignore_small_classes, list_datasets, load_dataset, load_split,
                                    write_split)
from diffseg_utils.toy.world import render

# ---------------------------------------------------------------------------------------------- legacy helpers


def test_shipped_toy_set_matches_the_world():
    tr = load_split(TOY_FEWSHOT_DIR, "train", num_classes=11)
    ref = render("fewshot_train", 0, 20)
    assert len(tr) == 20 and np.array_equal(tr.images, ref.images) and np.array_equal(tr.labels, ref.labels)
    assert len(load_split(TOY_FEWSHOT_DIR, "test")) == 20
    # the same folder through load_dataset (release layout, classes given)
    ds = load_dataset(TOY_FEWSHOT_DIR, split="test", class_names=("background",) + tuple("abcdefghij"))
    np.testing.assert_array_equal(ds.take().labels, render("fewshot_test", 0, 20).labels)


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


def test_small_class_rule_scales_with_the_image_area():
    """The official 20 pixels at 256², the same share at any size: 1.25 px at 64² (so a 1-px class goes, a
    2-px one stays; the unscaled rule dropped the toy faces' noses, median 14 px)."""
    big = np.zeros((1, 256, 256), np.int64)
    big[0, 0, :19] = 3   # 19 px < 20
    big[0, 1, :20] = 4   # 20 px
    out = ignore_small_classes(big)
    assert (out[0, 0, :19] == 255).all() and (out[0, 1, :20] == 4).all()
    small = np.zeros((1, 64, 64), np.int64)
    small[0, 0, 0] = 3        # 1 px < 1.25
    small[0, 1, :2] = 4       # 2 px
    small[0, 2, :14] = 5      # a 14-px nose
    out = ignore_small_classes(small)
    assert out[0, 0, 0] == 255 and (out[0, 1, :2] == 4).all() and (out[0, 2, :14] == 5).all()
    lab = np.zeros((1, 10, 10), np.int64)
    lab[0, :2, :5] = 3  # 10 % of the image
    out0 = ignore_small_classes(lab, min_fraction=0.2, ignore_index=0)  # Bedroom-28's ignore label
    assert (out0[0, :2, :5] == 0).all()
    with pytest.raises(ValueError, match="min_fraction"):
        ignore_small_classes(lab, min_fraction=20)


# ---------------------------------------------------------------------------------------------- DDPM-Seg configs
# Official values, read from yandex-research/ddpm-segmentation (commit 9a13776):
# experiments/<name>/ddpm.json -> number_class, ignore_label, training_number, testing_number, dim[0],
# steps, blocks, model_path; src/data_util.py -> <name>_class lists (first and last name, count).
OFFICIAL = {
    # experiments/bedroom_28/ddpm.json
    "bedroom_28": dict(num_classes=29, ignore_index=0, train=40, test=20, ckpt="lsun_bedroom.pt",
                       first="background", last="table staff"),
    # experiments/ffhq_34/ddpm.json
    "ffhq_34": dict(num_classes=34, ignore_index=255, train=20, test=20, ckpt="ffhq.pt",
                    first="background", last="head***wrinkles"),
    # experiments/cat_15/ddpm.json
    "cat_15": dict(num_classes=15, ignore_index=255, train=30, test=20, ckpt="lsun_cat.pt",
                   first="background", last="neck"),
    # experiments/horse_21/ddpm.json
    "horse_21": dict(num_classes=21, ignore_index=255, train=30, test=30, ckpt="lsun_horse.pt",
                     first="background", last="leg protection"),
    # experiments/celeba_19/ddpm.json
    "celeba_19": dict(num_classes=19, ignore_index=255, train=20, test=500, ckpt="ffhq.pt",
                      first="background", last="u_lip"),
    # experiments/ade_bedroom_30/ddpm.json (ade_bedroom_30_class = ade_bedroom_50_class[:30]: no background)
    "ade_bedroom_30": dict(num_classes=30, ignore_index=255, train=50, test=650, ckpt="lsun_bedroom.pt",
                           first="wall", last="television"),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_ddpmseg_config_matches_the_official_files(name):
    o, c = OFFICIAL[name], DDPMSEG_DATASETS[name]
    assert (c.num_classes, c.ignore_index) == (o["num_classes"], o["ignore_index"])
    assert (c.train_images, c.test_images) == (o["train"], o["test"])
    assert c.image_size == 256 and c.blocks == (5, 6, 7, 8, 12) and c.timesteps == (50, 150, 250)
    assert c.checkpoint == o["ckpt"]
    assert len(c.class_names) == c.num_classes and len(set(c.class_names)) == c.num_classes
    assert (c.class_names[0], c.class_names[-1]) == (o["first"], o["last"])
    # the name's number counts the scored classes: all but an ignore label inside the class range
    scored = c.num_classes - (0 <= c.ignore_index < c.num_classes)
    assert scored == int(name.rsplit("_", 1)[1])


def test_every_ddpmseg_dataset_and_world_is_registered():
    assert set(OFFICIAL) | {"toy-shapes", "toy-faces"} == set(list_datasets())


# ---------------------------------------------------------------------------------------------- DDPM-Seg folders
def _write_release(folder, n, num_classes, size=8, seed=0, suffix=".png"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}{suffix}")
        np.save(folder / f"img_{i:03d}.npy", rng.integers(0, num_classes, (size, size)).astype(np.uint8))


def test_ddpmseg_by_name_from_the_release_layout(tmp_path, monkeypatch):
    _write_release(tmp_path / "bedroom_28" / "real" / "train", 42, 29)   # 2 more than the official 40
    _write_release(tmp_path / "bedroom_28" / "real" / "test", 20, 29, seed=1, suffix=".jpg")
    ds = load_dataset("bedroom_28", root=tmp_path)
    assert len(ds) == 40 and ds.num_classes == 29 and ds.ignore_index == 0 and ds.image_size == (8, 8)
    assert ds.config is DDPMSEG_DATASETS["bedroom_28"] and ds.class_names[1] == "bed"
    assert ds[0].name == "img_000" and ds[39].name == "img_039"   # the first 40 sorted files, as the official loader
    np.testing.assert_array_equal(ds[5].label, np.load(tmp_path / "bedroom_28/real/train/img_005.npy"))
    te = load_dataset("Bedroom-28", split="test", root=tmp_path).take()
    assert te.images.shape == (20, 8, 8, 3) and te.labels.shape == (20, 8, 8) and te.labels.dtype == np.int64
    # the environment variable, and the tarball's datasets/ folder
    monkeypatch.setenv(DDPMSEG_ENV, str(tmp_path))
    assert len(load_dataset("bedroom_28", split="test")) == 20
    (tmp_path / "x" / "datasets").mkdir(parents=True)
    (tmp_path / "bedroom_28").rename(tmp_path / "x" / "datasets" / "bedroom_28")
    assert len(load_dataset("bedroom_28", split="test", root=tmp_path / "x")) == 20
    # a folder named after the dataset, by path
    assert load_dataset(tmp_path / "x" / "datasets" / "bedroom_28", split="test").ignore_index == 0
    with pytest.raises(ValueError, match="no validation split"):
        load_dataset("bedroom_28", split="validation", root=tmp_path / "x")
    # resized as the official code does (256 there; 16 here)
    big = load_dataset("bedroom_28", split="test", root=tmp_path / "x", size=16)
    assert big.image_size == (16, 16) and big[0].image.shape == (16, 16, 3) and big[0].label.shape == (16, 16)
    np.testing.assert_array_equal(big[0].label[::2, ::2], load_dataset("bedroom_28", split="test",
                                                                       root=tmp_path / "x")[0].label)


def test_ddpmseg_too_few_files_and_missing_dataset(tmp_path):
    _write_release(tmp_path / "cat_15" / "real" / "train", 10, 15)
    with pytest.raises(ValueError, match="holds 10 images.*30"):
        load_dataset("cat_15", root=tmp_path)
    assert len(load_dataset("cat_15", root=tmp_path, num_images=10)) == 10
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("horse_21", root=tmp_path)
    msg = str(e.value)
    assert DDPMSEG_DOWNLOAD_URL in msg and DDPMSEG_ENV in msg and str(tmp_path / "horse_21" / "real" / "train") in msg


def test_ddpmseg_label_out_of_range(tmp_path):
    d = tmp_path / "ffhq_34" / "real" / "train"
    _write_release(d, 20, 34)
    lab = np.load(d / "img_003.npy")
    lab[0, 0] = 255  # the ignore label: fine
    np.save(d / "img_003.npy", lab)
    assert len(load_dataset("ffhq_34", root=tmp_path)) == 20
    lab[0, 1] = 34   # one past the last class
    np.save(d / "img_003.npy", lab)
    with pytest.raises(ValueError, match=r"img_003.npy: labels \[34\] outside 0..33"):
        load_dataset("ffhq_34", root=tmp_path)
    ds = load_dataset("ffhq_34", root=tmp_path, validate=False)  # checked on access instead
    ds[2]
    with pytest.raises(ValueError, match="outside 0..33"):
        ds[3]


# ---------------------------------------------------------------------------------------------- procedural worlds
def test_toy_shapes_splits_are_the_world_and_disjoint():
    from diffseg_utils.toy import quality

    tr, te, va = (load_dataset("toy", split=s) for s in ("train", "test", "validation"))
    assert tr.name == "toy-shapes" and tr.num_classes == 11 and tr.ignore_index is None and tr.image_size == (64, 64)
    np.testing.assert_array_equal(tr.take(5).images, render("fewshot_train", 0, 5).images)
    np.testing.assert_array_equal(te.take(3, start=2).labels, render("fewshot_test", 2, 3).labels)
    np.testing.assert_array_equal(va[0].image, render("fewshot_test", VALIDATION_START, 1).images[0])
    assert VALIDATION_START == quality.VAL_START  # the same validation images as the few-shot probe
    assert va[0].name == f"fewshot_test/{VALIDATION_START}" and len(te) == VALIDATION_START
    with pytest.raises(ValueError, match="validation"):
        load_dataset("toy-shapes", split="test", num_images=VALIDATION_START + 1)
    # lazy and batch-independent: strided slices and single items agree with one render
    s = tr[1:9:3]
    np.testing.assert_array_equal(s.images, render("fewshot_train", 0, 9).images[1:9:3])
    assert s.names == ["fewshot_train/1", "fewshot_train/4", "fewshot_train/7"]
    assert load_dataset("toy-shapes", split="eval", size=32, max_objects=1)[0].image.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("toy-shapes", split="tset")


def test_toy_faces_classes_and_rendering():
    from diffseg_utils.toy.faces import PARTS, render_faces

    ds = load_dataset("toy-faces", split="validation", num_images=30)
    assert ds.class_names == ("background",) + PARTS and ds.num_classes == 11 and len(ds) == 30
    ref = render_faces("fewshot_test", VALIDATION_START + 4, 2)
    got = ds.take(2, start=4)
    np.testing.assert_array_equal(got.images, ref.images)
    np.testing.assert_array_equal(got.labels, ref.labels)
    with pytest.raises(ValueError, match="asked for items"):
        ds.take(5, start=28)
    with pytest.raises(ValueError, match="toy-shapes option"):
        load_dataset("toy-faces", max_objects=2)
    x, y = got.tensors()
    assert tuple(x.shape) == (2, 3, 64, 64) and str(x.dtype) == "torch.uint8" and str(y.dtype) == "torch.int64"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*bedroom_28.*toy-faces"):
        load_dataset("bedroom-29")


# ---------------------------------------------------------------------------------------------- folders
def test_grounding_export_loads_back_by_path(tmp_path):
    from diffseg_utils.grounding.export import export_segmentation_dataset

    b = render("eval", 0, 4)
    lab = b.labels.astype(np.int64)
    lab[1, :5, :5] = 255
    names = ("circle", "square", "triangle", "ring", "cross", "diamond", "star", "heart", "crescent", "hexagon")
    export_segmentation_dataset(tmp_path / "train", b.images, lab, names)
    export_segmentation_dataset(tmp_path / "test", b.images[:2], lab[:2], names)
    ds = load_dataset(tmp_path / "train")
    assert ds.class_names == ("background",) + names and ds.ignore_index == 255 and len(ds) == 4
    out = ds.take()
    np.testing.assert_array_equal(out.images, b.images)
    np.testing.assert_array_equal(out.labels, lab)
    assert len(load_dataset(tmp_path, split="test")) == 2  # splits as sub-folders


def test_generic_layout_npy_masks_and_background_null(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 5, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        np.save(tmp_path / "masks" / f"{i}.npy", np.full((6, 5), i, np.int32))
    (tmp_path / "classes.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "background": None,
                                                       "ignore_index": None}))
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("a", "b", "c") and ds.ignore_index is None and ds.image_size == (6, 5)
    assert [ds[i].label[0, 0] for i in range(3)] == [0, 1, 2]
    (tmp_path / "classes.json").write_text(json.dumps({"class_names": ["a", "b"], "background": None}))
    with pytest.raises(ValueError, match=r"2.npy: labels \[2\] outside 0..1"):
        load_dataset(tmp_path)


def _generic(tmp_path, n=3, size=8):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "images" / f"{i:05d}.png")
        Image.fromarray(np.ones((size, size), np.uint8)).save(tmp_path / "masks" / f"{i:05d}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"class_names": ["thing"]}))


def test_folder_errors(tmp_path):
    _generic(tmp_path)
    assert load_dataset(tmp_path).num_classes == 2
    (tmp_path / "masks" / "00001.png").unlink()
    with pytest.raises(ValueError, match="mismatched images and masks: 3 images, 2 masks.*00001.png"):
        load_dataset(tmp_path)
    Image.fromarray(np.ones((8, 7), np.uint8)).save(tmp_path / "masks" / "00001.png")
    with pytest.raises(ValueError, match=r"00001.png: label map is \(8, 7\) but its image is \(8, 8\)"):
        load_dataset(tmp_path)
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "masks" / "00001.png")
    with pytest.raises(ValueError, match="colour mask"):
        load_dataset(tmp_path)
    Image.fromarray(np.full((8, 8), 2, np.uint8)).save(tmp_path / "masks" / "00001.png")
    with pytest.raises(ValueError, match=r"labels \[2\] outside 0..1"):
        load_dataset(tmp_path)
    (tmp_path / "masks" / "00001.png").unlink()
    np.save(tmp_path / "masks" / "00001.npy", np.full((8, 8), 1.5))
    with pytest.raises(ValueError, match="non-integer"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="neither a dataset name nor an existing path"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no split folder"):
        load_dataset(tmp_path, split="test")
    (tmp_path / "masks").rename(tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="no masks/ folder"):
        load_dataset(tmp_path)
    (tmp_path / "labels").rename(tmp_path / "masks")
    (tmp_path / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match="no classes.json"):
        load_dataset(tmp_path)


def test_a_pickled_label_file_is_refused_without_running_it(tmp_path):
    _generic(tmp_path, n=1)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "masks" / "00000.png").unlink()
    np.save(tmp_path / "masks" / "00000.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="without unpickling"):
        load_dataset(tmp_path)
    assert not marker.exists()


def test_images_only_folder_and_files(tmp_path):
    for i, hw in enumerate([(8, 8), (8, 8), (6, 10)]):
        Image.fromarray(np.full((*hw, 3), i, np.uint8)).save(tmp_path / f"p{i}.jpg" if i == 2 else tmp_path / f"p{i}.png")
    ds = load_dataset(tmp_path)
    assert not ds.has_labels and ds.class_names is None and ds.image_size is None and len(ds) == 3
    assert ds[2].label is None and ds[2].image.shape == (6, 10, 3)
    out = ds.take()
    assert out.labels is None and isinstance(out.images, list)  # sizes differ: a list
    with pytest.raises(ValueError, match="differ in size"):
        out.tensors()
    two = load_dataset([tmp_path / "p1.png", str(tmp_path / "p0.png")])
    assert two.take().images.shape == (2, 8, 8, 3) and two[0].name == "p1"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset([tmp_path / "p9.png"])
    boxed = load_dataset(tmp_path, size=8).take().images  # the 6x10 image is letterboxed, not refused
    assert boxed.shape == (3, 8, 8, 3) and (boxed[2, 4] == 2).all() and (abs(boxed[2, 0].astype(int) - 128) <= 1).all()


def test_a_portrait_labelled_folder_runs_through_fewshot(tmp_path, sd_tiny):
    """Portrait 24x18 photos with PNG masks: letterboxed like the model's input, the border ignored in
    training and scoring, predictions back at each photo's own size."""
    import json

    import diffseg_utils as ds
    from diffseg_utils.pixel_classifier import EnsembleConfig

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for i in range(n):
            lab = np.zeros((24, 18), np.uint8)
            lab[6:18, 4:14] = 1 + i % 2
            img = np.where(lab[..., None] > 0, 200, 30).astype(np.uint8) + rng.integers(0, 20, (24, 18, 3), np.uint8)
            Image.fromarray(img).save(tmp_path / split / "images" / f"{i}.jpg")
            Image.fromarray(lab).save(tmp_path / split / "masks" / f"{i}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"class_names": ["square", "blob"]}))
    fd = ds.fewshot_splits(tmp_path, n_train=3, n_val=1, n_test=3, size=sd_tiny.resolution)
    assert fd.train.images.shape == (3, 64, 64, 3) and fd.train.labels.shape == (3, 64, 64)
    border = fd.train.labels[:, :, :8]  # 18/24 of 64 = 48 columns of image, 8 columns of border each side
    assert (border == fd.ignore_index).all() and (fd.train.labels[:, 32, 32] > 0).all()
    seg = ds.FewShotSegmenter(sd_tiny, ["up_blocks.1"], [50], fd.num_classes,
                              config=EnsembleConfig(num_classes=fd.num_classes, num_members=2, max_steps=20),
                              min_class_fraction=0).fit(fd.train.images, fd.train.labels, progress=False)
    res = seg.predict([np.asarray(Image.open(tmp_path / "test" / "images" / f"{i}.jpg")) for i in range(3)])
    assert [tuple(lab.shape) for lab in res.labels] == [(24, 18)] * 3 if isinstance(res.labels, list) else \
        tuple(res.labels.shape) == (3, 24, 18)


def test_a_synthetic_folder_trains_and_real_images_test(tmp_path):
    """Protocol II's exported synthetic set (one flat folder) as notebook 02's training data, scored on the real
    world's test split (`test=`); without a test set, or with other classes, a clear error."""
    from diffseg_utils.datasets import fewshot_splits
    from diffseg_utils.grounding.export import export_segmentation_dataset
    from diffseg_utils.toy.world import CATEGORIES

    b = render("eval", 0, 6)
    export_segmentation_dataset(tmp_path / "synthetic", b.images, b.labels.astype(np.int64), CATEGORIES)
    data = fewshot_splits(tmp_path / "synthetic", n_train=3, n_val=2, n_test=4, size=64, test="toy-shapes")
    np.testing.assert_array_equal(data.train.images, b.images[:3])
    np.testing.assert_array_equal(data.val.images, b.images[4:])
    real = load_dataset("toy-shapes", "test", size=64).take(4)
    np.testing.assert_array_equal(data.test.images, real.images)
    assert "test images from 'toy-shapes'" in data.note and data.class_names == ("background", *CATEGORIES)
    with pytest.raises(ValueError, match="test="):
        fewshot_splits(tmp_path / "synthetic", n_train=3, n_val=2, n_test=4, size=64)
    export_segmentation_dataset(tmp_path / "other", b.images, b.labels.astype(np.int64), CATEGORIES[::-1])
    with pytest.raises(ValueError, match="same classes in the same order"):
        fewshot_splits(tmp_path / "other", n_train=3, n_val=2, n_test=4, size=64, test="toy-shapes")
