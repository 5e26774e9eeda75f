import json

import numpy as np
import pytest

from dleaf_analysis.paths import DATA_DIR
from dleaf_analysis.scenes import (
    ObjectStats, SceneObject, UnknownSplitError, load_split, object_mask, pope_questions, render,
)
from dleaf_analysis.scenes.world import World


def test_scene_sampling_and_rendering_are_deterministic(world):
    a, b = world.sample_scene(123), world.sample_scene(123)
    assert a == b
    assert np.array_equal(render(world, a), render(world, b))
    assert world.sample_scene(124) != a


def test_image_shape_dtype(world):
    img = render(world, world.sample_scene(5))
    assert img.shape == (world.image_size, world.image_size, 3) and img.dtype == np.uint8


def test_object_counts_within_spec(world):
    for seed in range(300):
        sc = world.sample_scene(seed)
        assert world.spec["min_objects"] <= len(sc.objects) <= world.spec["max_objects"]
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= world.image_size and 0 <= y0 < y1 <= world.image_size


@pytest.mark.parametrize("seed", range(20))
def test_counterfactual_removal_changes_only_the_object(world, seed):
    sc = world.sample_scene(seed)
    obj = sc.objects[0]
    cf = sc.without(obj.name)
    diff = np.any(render(world, sc) != render(world, cf), axis=-1)
    assert obj.name not in cf.name_set
    mask = np.zeros_like(diff)
    for o in sc.objects:
        if o.name == obj.name:
            mask |= object_mask(world, o)
    assert diff.any()
    assert not (diff & ~mask).any(), "pixels outside the removed object changed"


def test_counterfactual_addition_changes_only_the_new_object(world):
    sc = world.sample_scene(7)
    name = next(c for c in world.classes if c not in sc.name_set)
    new = SceneObject(name, 3, 4, 16)
    cf = sc.with_object(new)
    diff = np.any(render(world, sc) != render(world, cf), axis=-1)
    assert diff.any() and not (diff & ~object_mask(world, new)).any()
    assert world.caption(cf).count(name) == 1
    with pytest.raises(ValueError, match="already"):
        cf.with_object(new)
    with pytest.raises(ValueError, match="not in this scene"):
        sc.without(name)


def test_captions_list_exactly_the_ground_truth(world):
    for seed in range(200):
        sc = world.sample_scene(seed)
        words = world.caption(sc).split()
        mentioned = [w for w in words if w in world.classes]
        assert sorted(mentioned) == sorted(sc.name_set)  # each object once, nothing else
        assert words[-1] == "."


def test_caption_grammar(world):
    assert world.object_list(["fork"]) == "a fork"
    assert world.object_list(["fork", "umbrella", "cup"]) == "a fork , an umbrella and a cup"


def test_cooccurrence_is_strong(world):
    split = load_split("train", world, limit=5000)
    stats = ObjectStats.from_scenes(split.scenes)
    for a, b in world.spec["strong_pairs"]:
        p_b_given_a = stats.cooccurrence.get((a, b), 0) / stats.frequency[a]
        assert p_b_given_a > 0.6, (a, b, p_b_given_a)
    # a loner is not tied to any group member
    assert stats.cooccurrence.get(("clock", "fork"), 0) / stats.frequency["clock"] < 0.3


def test_partner_absent_split(world):
    split = load_split("test-partner-absent", world, limit=50)
    assert all(world.is_partner_absent(s) for s in split.scenes)


def test_splits_match_shipped_manifests(world):
    for name in ("dev", "test", "test-partner-absent"):
        split = load_split(name, world)
        manifest = json.loads((DATA_DIR / "splits" / f"{name}.json").read_text())
        assert split.annotations_hash == manifest["annotations_hash"]
        assert len(split) == manifest["size"]
    dev = load_split("dev", world)
    assert dev.content_hash() == json.loads((DATA_DIR / "splits" / "dev.json").read_text())["content_hash"]


def test_splits_are_disjoint(world):
    dev, test = load_split("dev", world), load_split("test", world)
    assert not {s.seed for s in dev.scenes} & {s.seed for s in test.scenes}


def test_unknown_split_is_a_clear_error(world):
    with pytest.raises(UnknownSplitError, match="choose one of"):
        load_split("validation", world)


def test_modified_world_is_refused_by_manifest(tmp_path):
    spec = json.loads((DATA_DIR / "world.json").read_text())
    spec["p_partner"] = 0.2
    path = tmp_path / "world.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(RuntimeError, match="does not match its manifest"):
        load_split("dev", World.load(path))


def test_pope_questions(world):
    split = load_split("dev", world, limit=40)
    stats = ObjectStats.from_scenes(load_split("train", world, limit=3000).scenes)
    frames = {v: pope_questions(split, v, stats) for v in ("random", "popular", "adversarial")}
    for v, q in frames.items():
        assert (q["label"] == "yes").sum() == (q["label"] == "no").sum()
        for _, r in q.iterrows():
            present = split.scenes[r["image"]].name_set
            assert (r["object"] in present) == (r["label"] == "yes")
            assert r["question"] == f"is there {world.article(r['object'])} {r['object']} in the image ?"
    # adversarial negatives come from the present objects' groups far more often than random ones
    def same_group_rate(q):
        neg = q[q["label"] == "no"]
        return np.mean([
            any(world.group_of(r["object"]) == world.group_of(p) for p in split.scenes[r["image"]].name_set)
            for _, r in neg.iterrows()
        ])
    assert same_group_rate(frames["adversarial"]) > same_group_rate(frames["random"]) + 0.3
    assert pope_questions(split, "random", stats).equals(pope_questions(split, "random", stats))
    with pytest.raises(ValueError, match="choose one of"):
        pope_questions(split, "hard", stats)
