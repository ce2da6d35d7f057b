"""The synthetic generator: determinism, balance, ground truth consistent with the level, loadable lines."""

import json
from collections import Counter

import pytest

from grpo_fast.data import Scene, Target, load_seed
from grpo_fast.data.phrasing import count_question, count_reply, describe
from grpo_fast.data.scene import RADIUS
from grpo_fast.data.synthetic import main, write_dataset
from grpo_fast.models.tiny import TinySpec
from grpo_fast.vision import closest_grid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, write_dataset(out, 40, seed=3)


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    out, paths = data
    again = write_dataset(tmp_path / "a", 40, seed=3)
    other = write_dataset(tmp_path / "b", 40, seed=4)
    for split in ("train", "val"):
        assert paths[split].read_text() == again[split].read_text()
        assert paths[split].read_text() != other[split].read_text()
    assert (out / "images/train_00007.png").read_bytes() == (tmp_path / "a/images/train_00007.png").read_bytes()


def test_splits_are_balanced_and_every_line_loads(data):
    _, paths = data
    train, val = load_seed(paths["train"]), load_seed(paths["val"])
    assert (len(train), len(val)) == (36, 4)
    for items in (train, val):
        counts = Counter(it["level"] for it in items)
        assert counts["ambig"] == counts["unambig"]


def test_level_matches_the_number_of_referents(data):
    _, paths = data
    for it in load_seed(paths["train"]):
        scene, target = Scene.from_dict(it["scene"]), Target(**it["target"])
        n = len(scene.referents(target))
        assert (n >= 2) == (it["level"] == "ambig"), it
        assert target.shape in it["question"]
        if n >= 2:  # readings have distinct colours, so they can be told apart by name
            assert len({o.colour for o in scene.referents(target)}) == n


def test_canvas_sizes_give_varied_tile_counts(data):
    _, paths = data
    items = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    grids = {closest_grid(it["scene"]["width"], it["scene"]["height"], 64, 1, 4) for it in items}
    tiles = {cols * rows for cols, rows in grids}
    assert {2, 4} <= tiles  # 1x2, 2x1 and 2x2 grids (plus the thumbnail) at the tiny model's 64-pixel tiles


def test_objects_sit_one_per_cell_of_the_tile_grid(data):
    """Canvases are whole tiles of the tiny model and each object lies inside its own half-tile cell, so no tile
    edge cuts one (the generator's TILE must follow the model's tile size, which it cannot import)."""
    _, paths = data
    tile = TinySpec().tile_size
    cell = tile // 2
    for it in load_seed(paths["train"]):
        scene = Scene.from_dict(it["scene"])
        assert scene.width % tile == 0 and scene.height % tile == 0 and scene.width * scene.height <= 4 * tile * tile
        cells = set()
        for o in scene.objects:
            r, (cx, cy) = RADIUS[o.size], (o.x // cell, o.y // cell)
            assert (o.x - r) // cell == (o.x + r) // cell == cx and (o.y - r) // cell == (o.y + r) // cell == cy
            cells.add((cx, cy))
        assert len(cells) == len(scene.objects)


def test_cli_writes_splits_and_rejects_bad_n(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "4", "--seed", "0"])
    assert "train:" in capsys.readouterr().out
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "1"])
    assert "n must be at least 2" in capsys.readouterr().err


def test_caption_names_every_object_left_to_right(data):
    _, paths = data
    it = load_seed(paths["train"])[0]
    scene = Scene.from_dict(it["scene"])
    caption = describe(scene)
    ordered = sorted(scene.objects, key=lambda o: (o.x, o.y))
    positions = [caption.index(f"a {o.size} {o.colour} {o.shape}") for o in ordered]
    assert caption.startswith("I see ") and positions == sorted(positions)


def test_count_reply_counts_and_colours_the_referents_left_to_right(data):
    _, paths = data
    for it in load_seed(paths["train"])[:10]:
        scene, target = Scene.from_dict(it["scene"]), Target(**it["target"])
        referents = sorted(scene.referents(target), key=lambda o: (o.x, o.y))
        reply = count_reply(scene, target)
        number = {1: "one", 2: "two", 3: "three"}[len(referents)]
        assert reply.startswith(f"I see {number} {target.noun}{'s' if len(referents) > 1 else ''}: "), reply
        positions = [reply.index(f"a {o.colour} one") for o in referents]
        assert positions == sorted(positions) and reply.count(" one") == len(referents) + (number == "one")
        assert count_question(target) == f"How many {target.noun}s do you see?"
