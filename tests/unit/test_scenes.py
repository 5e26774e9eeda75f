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
    lo, hi = world.spec["instances_per_scene"]
    clo, chi = world.spec["classes_per_scene"]
    sizes = []
    for seed in range(300):
        sc = world.sample_scene(seed)
        sizes.append(len(sc.objects))
        assert len(sc.objects) <= hi and clo <= len(sc.name_set) <= chi
        assert all(sc.names.count(n) <= world.spec["max_instances_per_class"] for n in sc.name_set)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= world.image_size and 0 <= y0 < y1 <= world.image_size
            assert o.colour in world.spec["classes"][o.name]["colours"]
    assert np.mean(np.array(sizes) >= lo) > 0.9  # placement rarely fails to fit an instance


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
    assert name in {world.object_words[w] for w in world.caption(cf).split() if w in world.object_words}
    with pytest.raises(ValueError, match="already"):
        cf.with_object(new)
    with pytest.raises(ValueError, match="not in this scene"):
        sc.without(name)


def test_descriptions_name_exactly_the_ground_truth_plus_the_context_guess(world):
    n_context = n_possible = 0
    for seed in range(300):
        sc = world.sample_scene(seed)
        n_possible += world.context_guess(sc.name_set, sc.setting) is not None
        cap = world.caption(sc)
        named = {world.object_words[w] for w in cap.split() if w in world.object_words}
        extra = named - sc.name_set
        assert sc.name_set <= named  # every present class is described
        assert extra <= ({sc.context} if sc.context else set())  # the only absent object: the late guess
        if sc.context:
            n_context += 1
            assert cap.endswith(f"there may also be {world.article(sc.context)} {sc.context} nearby .")
            assert sc.context not in sc.name_set
        assert cap.split()[-1] == "."
    # the rate is per description that has a group-typical absent object to guess
    assert abs(n_context / n_possible - world.spec["p_absent_context"]) < 0.1, (n_context, n_possible)


def test_descriptions_follow_salience_order_with_attributes(world):
    sc = world.sample_scene(11)
    order = world.salience_order(sc)
    biggest = [max(o.size for o in sc.instances(n)) for n in order]
    assert biggest == sorted(biggest, reverse=True)
    cap = world.caption(sc)
    first_named = [world.object_words[w] for w in cap.split() if w in world.object_words]
    assert list(dict.fromkeys(first_named))[: len(order)] == order  # classes appear in salience order
    colour = world.colour_of(sc.instances(order[0])[0])
    assert colour in cap.split()[: 20]


def test_description_lengths_are_in_llava_regime(world):
    lengths = [len(world.caption(world.sample_scene(s)).split()) for s in range(500)]
    assert 60 <= np.percentile(lengths, 5) and np.median(lengths) <= 120
    assert np.mean(np.array(lengths) <= 144) > 0.99  # the default caption length holds nearly all


def test_plurals_map_to_their_class(world):
    assert world.object_words["knives"] == "knife" and world.object_words["cups"] == "cup"
    assert world.object_words["mice"] == "mouse"
    assert set(world.object_words.values()) == set(world.classes)


def test_cooccurrence_is_strong(world):
    split = load_split("train", world, limit=5000)
    stats = ObjectStats.from_scenes(split.scenes)
    for a, b in world.spec["strong_pairs"]:
        p_b_given_a = stats.cooccurrence.get((a, b), 0) / stats.frequency[a]
        assert p_b_given_a > 0.5, (a, b, p_b_given_a)
    # a loner is not tied to any group member
    assert stats.cooccurrence.get(("clock", "fork"), 0) / stats.frequency["clock"] < 0.3


def test_partner_absent_split(world):
    split = load_split("test-partner-absent", world, limit=50)
    assert all(world.is_partner_absent(s) for s in split.scenes)


def test_splits_match_shipped_manifests(world):
    for name in ("dev", "confirm", "test", "test-partner-absent", "replication"):
        split = load_split(name, world)
        manifest = json.loads((DATA_DIR / "splits" / f"{name}.json").read_text())
        assert split.annotations_hash == manifest["annotations_hash"]
        assert len(split) == manifest["size"]
    # `dleaf make-splits` would write the shipped manifest again, byte for byte (pixels and object statistics too)
    dev = load_split("dev", world)
    assert json.dumps(dev.manifest(), indent=1) + "\n" == (DATA_DIR / "splits" / "dev.json").read_text()


def test_manifest_object_stats_are_the_splits_own(world, monkeypatch):
    """POPE's popular/adversarial negatives read the train split's statistics from its manifest
    instead of sampling its 20,000 scenes: they must equal the statistics of the sampled split."""
    from dleaf_analysis.scenes import splits

    for name in ("dev", "train"):
        manifest = json.loads((DATA_DIR / "splits" / f"{name}.json").read_text())
        sampled = ObjectStats.from_scenes(load_split(name, world, verify=False).scenes)
        assert ObjectStats.from_dict(manifest["object_stats"]) == sampled, name
    splits.train_object_stats.cache_clear()
    monkeypatch.setattr(splits, "load_split", lambda *a, **k: pytest.fail("the train split was sampled"))
    assert splits.train_object_stats() == sampled
    splits.train_object_stats.cache_clear()
    # a manifest frozen for another world is not trusted: the statistics are recomputed from the split
    monkeypatch.setattr(World, "spec_hash", "another-world")
    with pytest.raises(pytest.fail.Exception, match="was sampled"):
        splits.train_object_stats()
    splits.train_object_stats.cache_clear()


def test_splits_are_disjoint(world):
    seeds = {n: {s.seed for s in load_split(n, world).scenes} for n in ("dev", "confirm", "test", "replication")}
    names = list(seeds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not seeds[a] & seeds[b], (a, b)
    assert len(seeds["replication"]) >= 2000 and len(seeds["dev"]) >= 1000


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


def test_a_limited_load_is_the_prefix_of_the_full_split_and_checked_on_it(world):
    """A short load verifies the hash of the shortest recorded prefix that covers it, and holds exactly
    the first scenes of the split (the per-process sample cache neither reorders nor shares lists)."""
    from dleaf_analysis.scenes.splits import SPLITS_DIR, annotations_hash, prefix_sizes

    manifest = json.loads((SPLITS_DIR / "dev.json").read_text())
    assert sorted(int(k) for k in manifest["prefix_hashes"]) == prefix_sizes(manifest["size"])
    short, longer = load_split("dev", world, limit=5), load_split("dev", world, limit=40)
    assert [s.to_dict() for s in short.scenes] == [s.to_dict() for s in longer.scenes[:5]]
    assert annotations_hash(longer.scenes[:8]) == manifest["prefix_hashes"]["8"]
    short.scenes.append(None)  # a caller's list is its own
    assert len(load_split("dev", world, limit=5).scenes) == 5


def test_a_tampered_prefix_hash_is_refused(tmp_path, monkeypatch, world):
    import dleaf_analysis.scenes.splits as splits

    for f in splits.SPLITS_DIR.glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    m = json.loads((tmp_path / "dev.json").read_text())
    m["prefix_hashes"]["16"] = "0" * 16
    (tmp_path / "dev.json").write_text(json.dumps(m))
    monkeypatch.setattr(splits, "SPLITS_DIR", tmp_path)
    load_split("dev", world, limit=8)  # its own prefix (8) is intact
    with pytest.raises(RuntimeError, match="first 16 scenes"):
        load_split("dev", world, limit=9)
