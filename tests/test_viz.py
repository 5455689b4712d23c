"""Plot helpers: deterministic colours, legends that name what occurs, the feature explorer."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffseg_utils.features import FeatureMaps  # noqa: E402
from diffseg_utils.viz import feature_explorer, label_legend, pca_rgb, show_features  # noqa: E402


def test_pca_rgb_is_deterministic_and_finds_the_main_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 16, generator=g) * 0.1
    x[0, :, :8] += 5  # one strong direction: left half vs right half
    a, b = pca_rgb(x), pca_rgb(x.clone())
    assert (a == b).all() and a.shape == (16, 16, 3) and a.dtype == np.uint8
    # the first component (red) separates the halves
    assert abs(float(a[:, :8, 0].mean()) - float(a[:, 8:, 0].mean())) > 200


def test_label_legend_lists_only_present_classes_and_marks_unseen():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    label_legend(ax, ["background", "circle", "heart"], np.array([[0, 2]]), unseen=("heart",))
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["background", "heart *"] and "unseen" in ax.get_legend().get_title().get_text()
    plt.close(fig)


class _Handle:
    def update(self, obj):
        pass


def test_show_features_and_explorer_draw(monkeypatch):
    import matplotlib.pyplot as plt

    maps = {(t, "b"): torch.randn(2, 4, 4, 4) for t in (10, 20)}
    fm = FeatureMaps(maps, (8, 8), [10, 20], ["b"])
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    labs = np.zeros((2, 8, 8), np.int64)
    axes = show_features(fm, imgs, labs, "b", 20, idx=1, class_names=["background"])
    assert len(axes) == 4
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append(obj) or _Handle())
    assert feature_explorer(fm, imgs, labs, ["b"], [10, 20], t=20) is None
    fig, controls = shown
    assert len(fig.axes) == 4 and "live kernel" in controls["text/plain"]   # a figure, then the controls
    plt.close("all")
