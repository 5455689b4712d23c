"""Grounded Diffusion's data pipeline: prompts, labels without zero masks, shards that resume, accelerate."""
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from diffseg_utils import load_backbone
from diffseg_utils.grounding.export import export_segmentation_dataset, load_segmentation_dataset
from diffseg_utils.grounding.features import GeneratedBatch, generate_with_features
from diffseg_utils.grounding.labelers import SegmenterLabeler
from diffseg_utils.grounding.prompts import MAX_CLASSES, PAPER_TEMPLATE, prompt_template, sample_prompt, sample_seed
from diffseg_utils.grounding.segmenter import SegmenterOutput
from diffseg_utils.grounding.shards import GroundingShards, MissingShardsError, synthesize, to_uint8, write_index
from diffseg_utils.registry import REPO_ROOT
from diffseg_utils.toy import grounding_defaults as toy_defaults
from diffseg_utils.toy.world import SEEN_CATEGORIES

TINY = dict(num_steps=2, guidance_scale=5.0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # one thread: the same kernels as each launched process (bitwise-equal results), and no
    # OpenMP spinning against other jobs on a busy 2-core machine (2 threads ran 50x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", device="cpu")


@pytest.fixture(scope="module")
def oracle_labeler():
    return SegmenterLabeler(toy_defaults.oracle_segmenter())  # named "oracle", as the CLI's


class CountingLabeler:
    """Wraps a labeler and counts the images it labels (a shard that is skipped is never labelled)."""

    def __init__(self, inner):
        self.inner, self.calls, self.images = inner, 0, 0
        self.config = inner.config

    def __call__(self, batch, names):
        self.calls += 1
        self.images += len(names)
        return self.inner(batch, names)


def test_prompts_are_deterministic_and_name_only_given_classes():
    classes = ["circle", "star", "ring", "cross"]
    drawn = [sample_prompt(classes, i, seed=3) for i in range(200)]
    assert drawn == [sample_prompt(classes, i, seed=3) for i in range(200)]
    assert drawn != [sample_prompt(classes, i, seed=4) for i in range(200)]
    counts = {1: 0, 2: 0}
    for prompt, names in drawn:
        assert set(names) <= set(classes) and len(set(names)) == len(names)
        counts[len(names)] += 1
        expected = f"a photograph of a {names[0]}" + (f" and a {names[1]}" if len(names) == 2 else "")
        assert prompt == expected
    assert counts[1] > 50 and counts[2] > 50  # two_prob = 0.5
    assert all(len(sample_prompt(classes, i, two_prob=0.0)[1]) == 1 for i in range(50))
    assert all(sample_prompt(["star"], i)[1] == ["star"] for i in range(20))


class FakeSegmenter:
    """The segmenter interface with fixed outputs: 'a' twice (two instances), 'b' and 'c'."""

    class_names = ("a", "b", "a", "c")

    def __init__(self):
        m = torch.zeros(2, 4, 8, 8, dtype=torch.bool)
        m[:, 0, :2] = True     # a, instance 1
        m[:, 1, 2:4] = True    # b
        m[:, 2, 4:6] = True    # a, instance 2
        self.masks = m         # c: an empty mask
        self.scores = torch.tensor([[0.3, 0.01, 0.9, 0.8],
                                    [0.3, 0.50, 0.2, 0.8]])

    def __call__(self, images):
        assert images.shape == (2, 3, 8, 8)
        return SegmenterOutput(self.masks, self.scores, self.class_names)


def test_missed_classes_are_invalid_never_empty_negatives():
    batch = GeneratedBatch(torch.zeros(2, 3, 8, 8), {}, ["", ""], 1)
    masks, valid = SegmenterLabeler(FakeSegmenter(), min_score=0.05)(batch, [["a", "b"], ["c", "zebra"]])
    assert masks.shape == (2, MAX_CLASSES, 8, 8) and masks.dtype == torch.bool
    # the top-scoring 'a' instance; 'b' below min_score; 'c' has an empty mask; 'zebra' unknown
    assert valid.tolist() == [[True, False], [False, False]]
    assert torch.equal(masks[0, 0], FakeSegmenter().masks[0, 2])
    assert not masks[~valid].any()
    # in image 1 the first 'a' instance wins and 'b' is found
    masks, valid = SegmenterLabeler(FakeSegmenter())(batch, [["b"], ["a"]])
    assert valid.tolist() == [[False, False], [True, False]]  # image 0: b scores 0.01; pad is never valid
    assert torch.equal(masks[1, 0], FakeSegmenter().masks[1, 0])


def test_a_labeler_restricted_to_some_classes_leaves_the_others_unlabelled():
    """Protocol II's ablation: the segmenter may name only the seen classes; an unseen one it finds stays unlabelled."""
    batch = GeneratedBatch(torch.zeros(2, 3, 8, 8), {}, ["", ""], 1)
    full = SegmenterLabeler(FakeSegmenter())(batch, [["a", "b"], ["b", "a"]])
    lab = SegmenterLabeler(FakeSegmenter(), classes=["a"])
    masks, valid = lab(batch, [["a", "b"], ["b", "a"]])
    assert full[1].tolist() == [[True, False], [True, True]]
    assert valid.tolist() == [[True, False], [False, True]]
    assert torch.equal(masks[valid], full[0][valid]) and not masks[~valid].any()
    assert lab.config["classes"] == ["a"] and "classes" not in SegmenterLabeler(FakeSegmenter()).config


def test_shards_hold_what_generate_with_features_returns(toy, oracle_labeler, tmp_path):
    classes = list(SEEN_CATEGORIES)
    synthesize(toy, oracle_labeler, tmp_path, num_samples=4, class_names=classes, shard_size=4, batch_size=4,
               seed=5, **TINY)
    data = GroundingShards(tmp_path)
    assert len(data) == 4 and data.seeds.tolist() == [sample_seed(5, i) for i in range(4)]
    prompts = [sample_prompt(classes, i, 5, prompt_template(toy))[0] for i in range(4)]
    assert data.prompts == prompts
    ref = generate_with_features(toy, prompts, num_steps=2, guidance_scale=5.0, seed=data.seeds.tolist())
    assert data.timestep == ref.timestep
    assert set(data.features) == set(ref.features)
    for r, f in ref.features.items():
        assert data.features[r].dtype == torch.float16 and torch.equal(data.features[r], f)
    assert torch.equal(data.images, to_uint8(ref.images))
    masks, valid = oracle_labeler(ref, data.names)
    assert torch.equal(data.masks, masks) and torch.equal(data.valid, valid)
    for i, names in enumerate(data.names):
        ids = data.class_ids[i].tolist()
        assert [classes[k] for k in ids[:len(names)]] == names and all(k == -1 for k in ids[len(names):])
    # a sample does not depend on its batch: samples 0..3 at once == 0..1 then 2..3, and batch_size=3
    # (3 + 1) writes the same data up to CPU kernels that differ with the batch size in the last bits
    halves = [generate_with_features(toy, prompts[s:s + 2], num_steps=2, seed=data.seeds[s:s + 2].tolist())
              for s in (0, 2)]
    torch.testing.assert_close(torch.cat([h.images for h in halves]), ref.images, atol=1e-4, rtol=0)
    synthesize(toy, oracle_labeler, tmp_path / "b3", num_samples=4, class_names=classes, shard_size=4, batch_size=3,
               seed=5, **TINY)
    b3 = GroundingShards(tmp_path / "b3")
    assert b3.prompts == data.prompts and (b3.images.int() - data.images.int()).abs().max() <= 1
    for r, f in data.features.items():
        torch.testing.assert_close(b3.features[r].float(), f.float(), atol=1e-2, rtol=1e-2)


def test_resume_regenerates_only_missing_shards(toy, oracle_labeler, tmp_path):
    counter = CountingLabeler(oracle_labeler)
    kw = dict(num_samples=6, class_names=list(SEEN_CATEGORIES), shard_size=2, batch_size=4, seed=1, **TINY)
    paths = synthesize(toy, counter, tmp_path, **kw)
    assert [p.name for p in paths] == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    assert counter.images == 6
    before = GroundingShards(tmp_path)
    index = write_index(tmp_path)
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 2]
    assert sum(index["labelled_per_class"].values()) == int(before.valid.sum())
    mtimes = {p.name: p.stat().st_mtime_ns for p in paths}
    paths[1].unlink()
    with pytest.raises(MissingShardsError, match=r"shard_00001\.pt(.|\n)*python -m diffseg_utils\.grounding\.synth"):
        GroundingShards(tmp_path)
    assert len(GroundingShards(tmp_path, shards=[0, 2])) == 4  # a subset still loads
    synthesize(toy, counter, tmp_path, **kw)
    assert not (tmp_path / "index.json").exists()  # stale once a shard was missing; write_index() again
    assert counter.images == 8  # only shard 1's two samples were labelled again
    assert {p.name: p.stat().st_mtime_ns for p in (paths[0], paths[2])} == {k: mtimes[k] for k in
                                                                           ("shard_00000.pt", "shard_00002.pt")}
    after = GroundingShards(tmp_path)
    for key in ("images", "masks", "valid", "class_ids", "seeds"):
        assert torch.equal(getattr(before, key), getattr(after, key)), key
    assert before.names == after.names and before.prompts == after.prompts
    for r in before.features:
        assert torch.equal(before.features[r], after.features[r])
    # label maps for export: 0 = background, k = class_names[k - 1], valid masks only
    lab = after.index_masks()
    assert lab.shape == (6, 64, 64) and set(lab.unique().tolist()) <= set(range(len(SEEN_CATEGORIES) + 1))
    # other settings in the same directory are refused, naming the field
    with pytest.raises(ValueError, match="shard_size: 2 in the manifest, 3 now"):
        synthesize(toy, counter, tmp_path, **{**kw, "shard_size": 3})
    with pytest.raises(ValueError, match=r"(?s)seed.*new output directory"):
        synthesize(toy, counter, tmp_path, **{**kw, "seed": 2})
    # and so are other weights: a retrained backbone never silently reuses a stale dataset
    w = next(toy.denoiser.parameters())
    keep = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        with pytest.raises(ValueError, match="backbone_weights"):
            synthesize(toy, counter, tmp_path, **kw)
    finally:
        with torch.no_grad():
            w.copy_(keep)
    # rank 1 of 2 owns shard 1 only
    assert [p.name for p in synthesize(toy, counter, tmp_path, **kw, rank=1, world_size=2)] == ["shard_00001.pt"]


def test_export_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["circle", "star", "ring"]
    images = rng.integers(0, 256, size=(3, 3, 16, 20), dtype=np.uint8)  # (N, 3, H, W)
    labels = rng.integers(0, len(classes) + 1, size=(3, 16, 20))
    labels[0, 0, :5] = 255  # ignore
    export_segmentation_dataset(tmp_path / "ds", torch.from_numpy(images), labels, classes)
    assert sorted(p.name for p in (tmp_path / "ds" / "masks").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    split, names = load_segmentation_dataset(tmp_path / "ds")
    assert names == classes
    np.testing.assert_array_equal(split.images, images.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(split.labels, labels)
    export_segmentation_dataset(tmp_path / "hwc", images.transpose(0, 2, 3, 1), labels, classes)
    np.testing.assert_array_equal(load_segmentation_dataset(tmp_path / "hwc")[0].images, split.images)
    with pytest.raises(ValueError, match="outside"):
        export_segmentation_dataset(tmp_path / "bad", images, labels + 1, classes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _burn_cpu(seconds: float) -> subprocess.Popen:
    """A busy-looping process at the lowest priority: load on the CPU that barely slows other jobs."""
    code = f"import os, time; os.nice(19); end = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(toy, oracle_labeler, tmp_path):
    # accelerate's --cpu starts ONE process (no mpirun here); --multi_gpu starts torchrun workers and
    # the script asks for CPU processes itself when there is no GPU. Busy CPUs (the burner, plus
    # whatever else runs) made rank 1 write a shard before rank 0 wrote the manifest: writes are now
    # ordered by a barrier, so this holds under load.
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "diffseg_utils.grounding.synth",
           "--backbone", "toy", "--defaults", "diffseg_utils.toy.grounding_defaults:TOY", "--out", str(out),
           "--num-samples", "4", "--shard-size", "1", "--num-steps", "2", "--guidance-scale", "5.0", "--seed", "7",
           "--classes", "seen", "--labeler", "oracle", "--no-progress"]
    burner = _burn_cpu(120)
    try:
        res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        burner.kill()
        burner.wait()
    # stdout and stderr of both ranks (the launcher forwards them): a failure shows every traceback
    assert res.returncode == 0, f"--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-8000:]}"
    index = json.loads((out / "index.json").read_text())
    assert index["num_shards"] == 4 and [s["rank"] for s in index["shards"]] == [0, 1, 0, 1]
    two = GroundingShards(out)
    assert two.ranks.tolist() == [0, 1, 0, 1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: same kernels, same bits
    try:
        synthesize(toy, oracle_labeler, tmp_path / "one", num_samples=4, class_names=SEEN_CATEGORIES, shard_size=1,
                   seed=7, **TINY)
    finally:
        torch.set_num_threads(threads)
    one = GroundingShards(tmp_path / "one")
    assert json.loads((out / "manifest.json").read_text()) == one.manifest
    for key in ("images", "masks", "valid", "class_ids", "seeds", "indices"):
        assert torch.equal(getattr(one, key), getattr(two, key)), key
    assert one.names == two.names and one.prompts == two.prompts
    for r in one.features:
        assert torch.equal(one.features[r], two.features[r]), r


def test_failing_rank_names_itself_and_its_error(tmp_path):
    # a rank that fails says which one and why (before, its peer's gloo connection error was all one saw)
    code = ("import torch, accelerate\nfrom diffseg_utils.grounding import synth\n"
            "class S:\n process_index, num_processes, is_main_process, device = 1, 2, False, torch.device('cpu')\n"
            " def wait_for_everyone(self): pass\n"
            "accelerate.PartialState = lambda cpu: S()\n"
            f"synth.main(['--backbone', 'toy', '--out', {str(tmp_path)!r}, '--num-samples', '2', '--classes', 'star',"
            " '--labeler', 'nosuch'])")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert err.returncode != 0
    assert "[rank 1/2] FAILED: ValueError: --labeler 'nosuch' is not known" in err.stderr, err.stderr[-3000:]
    assert "Traceback" in err.stderr


class ManifestWitness:
    """Wraps a labeler; records whether the manifest existed each time it labels (just before a shard is written)."""

    def __init__(self, inner, out_dir):
        self.inner, self.out_dir, self.config = inner, out_dir, inner.config
        self.segmenter = inner.segmenter  # the same manifest entry (weights fingerprint) as the labeler it wraps
        self.saw_manifest = []
        self.called = threading.Event()

    def __call__(self, batch, names):
        self.saw_manifest.append((self.out_dir / "manifest.json").exists())
        self.called.set()
        return self.inner(batch, names)


def test_rank_one_never_writes_a_shard_before_the_manifest(toy, oracle_labeler, tmp_path):
    """Rank 1 starting first (a busy machine) waits for rank 0's manifest instead of writing shards.

    Before the writes were ordered, rank 1 labelled and wrote shard 1 at once, and rank 0 then
    refused the directory ("holds shards but no manifest.json").
    """
    kw = dict(num_samples=2, class_names=list(SEEN_CATEGORIES), shard_size=1, seed=3, world_size=2, **TINY)
    witness, errors = ManifestWitness(oracle_labeler, tmp_path), []

    def rank1():
        try:
            synthesize(toy, witness, tmp_path, rank=1, manifest_timeout=120, **kw)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=rank1)
    t.start()
    witness.called.wait(timeout=2.0)  # an unordered rank 1 labels (then writes) right away
    synthesize(toy, oracle_labeler, tmp_path, rank=0, **kw)
    t.join(120)
    assert not errors, errors
    assert witness.saw_manifest == [True], "rank 1 labelled a shard before rank 0 wrote manifest.json"
    assert len(GroundingShards(tmp_path)) == 2
    # with a barrier, rank 0 checks the manifest before the barrier: a bad directory fails before any rank writes
    calls = []
    with pytest.raises(ValueError, match="seed: 3 in the manifest, 4 now"):
        synthesize(toy, oracle_labeler, tmp_path, rank=0, barrier=lambda: calls.append(1), **{**kw, "seed": 4})
    assert calls == []


def test_template_comes_from_the_backbone_and_is_recorded(toy, oracle_labeler, tmp_path, monkeypatch):
    assert prompt_template(object()) == PAPER_TEMPLATE == "a photograph of a {}"
    monkeypatch.setattr(toy, "prompt_template", "a photo of a {}", raising=False)
    assert prompt_template(toy) == "a photo of a {}"
    kw = dict(num_samples=2, class_names=["star", "ring"], shard_size=2, seed=0, **TINY)
    synthesize(toy, oracle_labeler, tmp_path, **kw)
    data = GroundingShards(tmp_path, features=False)
    assert data.manifest["template"] == "a photo of a {}"
    assert all(p.startswith("a photo of a ") for p in data.prompts)
    # data made with another template is refused, naming the field
    monkeypatch.setattr(toy, "prompt_template", PAPER_TEMPLATE)
    with pytest.raises(ValueError, match="template: 'a photo of a {}' in the manifest, 'a photograph of a {}' now"):
        synthesize(toy, oracle_labeler, tmp_path, **kw)
    with pytest.raises(ValueError, match="slot"):
        synthesize(toy, oracle_labeler, tmp_path / "bad", template="a photo", **kw)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
def test_shards_are_read_lazily(tmp_path):
    """Opening a dataset maps its shards instead of reading them: memory does not grow with its features."""
    from diffseg_utils.grounding.shards import MANIFEST, _save_shard, shard_path

    n, per, res = 4, 8, 64                          # 4 shards of 8 samples, 64 ch at 64x64 fp16: 16 MiB each
    manifest = {"num_samples": n * per, "shard_size": per, "class_names": ["a", "b"], "labeler": {"name": "x"}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    g = torch.Generator().manual_seed(0)
    feats = []
    for k in range(n):
        f = torch.randn(per, 256, res, res, generator=g).to(torch.float16)
        feats.append(f)
        _save_shard({"images": torch.zeros(per, 3, 8, 8, dtype=torch.uint8), "features": {res: f},
                     "names": [["a"]] * per, "class_ids": torch.zeros(per, 2, dtype=torch.long),
                     "masks": torch.zeros(per, 2, 8, 8, dtype=torch.bool), "valid": torch.ones(per, 2, dtype=torch.bool),
                     "prompts": ["p"] * per, "seeds": torch.arange(per), "indices": torch.arange(k * per, (k + 1) * per),
                     "timestep": 1, "shard": k, "rank": 0, "world_size": 1}, shard_path(tmp_path, k))
    total = sum(f.numel() * 2 for f in feats)       # 64 MiB of features on disk
    del f
    before = _rss_bytes()
    data = GroundingShards(tmp_path)
    grown = _rss_bytes() - before
    assert grown < total / 4, f"opening grew RSS by {grown / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of features"
    # rows gathered across shards, in the order asked, equal the stored ones
    idx = torch.tensor([31, 0, 9, 9, 17])
    b = data.batch(idx)
    ref = torch.cat(feats)[idx]
    assert torch.equal(b["features"][res], ref) and b["masks"].shape == (5, 2, 8, 8)
    assert data[9]["index"] == 9 and torch.equal(data[9]["features"][res], feats[1][1])
    with pytest.raises(IndexError):
        data.batch([32])


def test_labeler_config_fingerprints_wrapped_weights():
    from diffseg_utils.grounding.labelers import labeler_config

    net = torch.nn.Conv2d(3, 2, 1)
    lab = SegmenterLabeler(net, name="tiny")
    before = labeler_config(lab)
    assert before["name"] == "tiny" and len(before["weights"]) == 12
    with torch.no_grad():
        net.weight.mul_(2)
    assert labeler_config(lab)["weights"] != before["weights"]


def test_manifest_and_shard_writes_are_safe_under_concurrency(tmp_path):
    """Two runs: the manifest is created exclusively (never overwritten by a second, different run), and a
    shard write never deletes another process's temporary file."""
    import json
    import os

    from diffseg_utils.grounding import shards as sh

    cfg_a, cfg_b = {"num_samples": 4, "seed": 0}, {"num_samples": 4, "seed": 1}
    sh._check_or_write_manifest(tmp_path, cfg_a, write=True)
    with pytest.raises(FileExistsError):
        sh._create_exclusive(tmp_path / sh.MANIFEST, json.dumps(cfg_b))
    sh._check_or_write_manifest(tmp_path, cfg_a, write=True)  # a second rank-0 run with the same settings: fine
    assert json.loads((tmp_path / sh.MANIFEST).read_text()) == cfg_a
    other = tmp_path / f"shard_0000.pt.tmp{os.getpid() + 1}"  # another process mid-write
    other.write_bytes(b"partial")
    sh._save_shard({"x": torch.zeros(2)}, sh.shard_path(tmp_path, 0))
    assert other.exists() and torch.load(sh.shard_path(tmp_path, 0), weights_only=True)["x"].shape == (2,)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name and p != other]


def test_grounding_defaults_resolve_by_name_and_refuse_what_is_not_one():
    from diffseg_utils.grounding.defaults import GroundingDefaults, resolve_defaults
    from diffseg_utils.toy.grounding_defaults import TOY, TOY_SD3

    assert resolve_defaults("diffseg_utils.toy.grounding_defaults:TOY") is TOY
    assert TOY_SD3.class_sets == TOY.class_sets and TOY_SD3.checkpoint != TOY.checkpoint
    assert resolve_defaults(None, None) is None
    with pytest.raises(ValueError, match="package.module:NAME"):
        resolve_defaults("diffseg_utils.toy.grounding_defaults")
    with pytest.raises(ValueError, match="not a GroundingDefaults"):
        resolve_defaults("diffseg_utils.toy.grounding_defaults:CLASS_SETS")
    with pytest.raises(ValueError, match="cannot load"):
        resolve_defaults("diffseg_utils.toy.grounding_defaults:NOPE")
    with pytest.raises(ValueError, match="missing"):
        GroundingDefaults(class_sets={"seen": ("a",)}, segmenter=print)
