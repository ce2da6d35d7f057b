"""SFT warm start: a few steps lower the loss and write checkpoint, loss curve and metrics; bad input fails clearly."""

import json
import math
import random

import pytest
import torch

from grpo_fast.data.phrasing import DESCRIBE_QUESTION
from grpo_fast.data.scene import Scene, SceneObject, render
from grpo_fast.data.seed import load_seed
from grpo_fast.data.synthetic import write_dataset
from grpo_fast.models import load_policy
from grpo_fast.sft import SFTConfig, train
from grpo_fast.sft.__main__ import main, parse_args
from grpo_fast.sft.targets import describe_share, sft_examples
from grpo_fast.sft.text import TINY_VISION_STEPS, resolved_vision_steps
from grpo_fast.sft.vision import pretrain_vision


@pytest.fixture(autouse=True)
def _restore_threads():
    """train() sets torch's process-wide thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_few_steps_lower_the_loss_and_write_outputs(tmp_path):
    cfg = SFTConfig(
        synthetic_items=16,
        vision_steps=2,
        steps=12,
        batch_size=4,
        lr=4e-3,
        warmup=3,
        out=str(tmp_path),
        eval_items=2,
        max_new_tokens=6,
    )
    metrics = train(cfg)
    assert {"vision_loss_last", "vision_val_acc/shape", "vision_val_acc/colour", "vision_seconds"} <= set(metrics)
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 1.0  # ~6.0 (uniform over 400) to ~4
    assert 0.0 <= metrics["val_reward"] <= 1.0 and metrics["val_loss"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert json.loads((tmp_path / "checkpoint/sft_config.json").read_text())["steps"] == 12
    assert load_policy(tmp_path / "checkpoint").image_seq_length == 16


def test_vision_pretraining_lowers_its_loss_then_sft_keeps_the_tower_frozen(tmp_path, synthetic_data, monkeypatch):
    items = load_seed(synthetic_data / "train.jsonl")
    policy = load_policy("tiny")
    tower = {k: v.clone() for k, v in policy.model.model.vision_tower.state_dict().items()}
    metrics = pretrain_vision(policy, items, items[:4], 30, 8, 4e-3, lambda s: 1.0, seed=0)
    assert metrics["vision_loss_last"] < 0.6 * metrics["vision_loss_first"]  # ~4.5 (3 uniform heads) to < 2.7
    assert all(0.0 <= metrics[f"vision_val_acc/{a}"] <= 1.0 for a in ("shape", "colour", "size"))
    changed = policy.model.model.vision_tower.state_dict()
    assert all(not torch.equal(tower[k], changed[k]) for k in tower if k.endswith("weight"))

    after_vision = {}

    def pretrain_and_snapshot(policy, *args):
        metrics = pretrain_vision(policy, *args)
        after_vision.update({k: v.clone() for k, v in policy.model.state_dict().items()})
        return metrics

    monkeypatch.setattr("grpo_fast.sft.text.pretrain_vision", pretrain_and_snapshot)
    cfg = SFTConfig(data=str(synthetic_data), vision_steps=3, steps=3, batch_size=4, out=str(tmp_path / "out"))
    train(cfg)
    final = load_policy(tmp_path / "out/checkpoint").model.state_dict()
    tower_keys = [k for k in final if ".vision_tower." in k]
    assert tower_keys and all(torch.equal(final[k], after_vision[k]) for k in tower_keys)
    assert not torch.equal(
        final["model.language_model.embed_tokens.weight"], after_vision["model.language_model.embed_tokens.weight"]
    )


def test_vision_pretraining_counts_on_the_one_tile_of_a_one_tile_image(tmp_path):
    policy = load_policy("tiny")
    scenes = {
        "one": Scene(64, 64, (240, 240, 240), (SceneObject("circle", "red", "big", 16, 16),)),
        "empty": Scene(64, 64, (240, 240, 240), ()),
    }
    items = {}
    for name, scene in scenes.items():
        render(scene).save(tmp_path / f"{name}.png")
        items[name] = {"image": str(tmp_path / f"{name}.png"), "scene": scene.to_dict()}
    # the one tile is the whole picture, so its tokens on the circle are asked how many circles there are
    metrics = pretrain_vision(policy, [items["one"]], [items["one"]], 2, 1, 1e-3, lambda s: 1.0, seed=0)
    assert math.isfinite(metrics["vision_loss_last"]) and 0.0 <= metrics["vision_val_acc/count"] <= 1.0
    # no object: nothing under any token, so no count (nor shape) is measured
    metrics = pretrain_vision(policy, [items["empty"]], [items["empty"]], 2, 1, 1e-3, lambda s: 1.0, seed=0)
    assert math.isfinite(metrics["vision_loss_last"])
    assert "vision_val_acc/count" not in metrics and "vision_val_acc/shape" not in metrics


def test_vision_steps_default_to_pretraining_only_a_preset_model():
    assert resolved_vision_steps(SFTConfig()) == TINY_VISION_STEPS
    assert resolved_vision_steps(SFTConfig(model="path/to/checkpoint")) == 0
    assert resolved_vision_steps(SFTConfig(model="path/to/checkpoint", vision_steps=5)) == 5


def test_cli_flags_come_from_the_config():
    cfg = parse_args(["--steps", "7", "--skip-bad-lines", "--targets", "gold", "--lr", "0.1"])
    assert (cfg.steps, cfg.skip_bad_lines, cfg.targets, cfg.lr, cfg.model) == (7, True, "gold", 0.1, "tiny")


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "cosine decay to 10%" in out and "--describe-end" in out and "--count" in out
    assert "--targets {mixed,gold}" in out and "--skip-bad-lines [BOOL]" in out
    assert "--vision-steps" in out and parse_args(["--vision-steps", "none"]).vision_steps is None


def test_describe_share_is_constant_or_linear_to_describe_end():
    assert [describe_share(s, steps=5, start=0.3, end=None) for s in range(5)] == [0.3] * 5
    # 0.8 -> 0.0 over steps 0..4: 0.2 less per step
    shares = [describe_share(s, steps=5, start=0.8, end=0.0) for s in range(5)]
    assert shares == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert parse_args(["--describe-end", "0.1"]).describe_end == 0.1
    assert parse_args(["--describe-end", "none"]).describe_end is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "has no train.jsonl"),
        (["--data", "{tmp}/empty"], "no usable items"),
        (["--data", "{tmp}/seed"], "--targets mixed needs synthetic items"),
        (["--synthetic-items", "4", "--model", "nope"], "unknown model 'nope'"),
        (["--steps", "0"], "steps, batch_size and vision_batch_size must be >= 1"),
        (["--vision-batch-size", "0"], "steps, batch_size and vision_batch_size must be >= 1"),
        (["--describe", "0.8", "--count", "0.4"], "describe \\+ count <= 1"),
        (["--vision-steps", "-1"], "vision_steps must be >= 0"),
        (["--data", "{tmp}/seed", "--targets", "gold"], "vision pretraining needs synthetic items"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/train.jsonl").write_text("\n")
    paths = write_dataset(tmp_path / "seed", 4, seed=0)
    lines = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    paths["train"].write_text(
        "".join(json.dumps({k: d[k] for k in ("image", "level", "question", "answer")}) + "\n" for d in lines)
    )
    with pytest.raises(SystemExit, match=message) as err:
        main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)


def test_cli_errors_are_one_line_with_exit_code_2(capsys):
    for args in (["--targets", "silver"], ["--steps", "many"], ["--bogus"]):
        with pytest.raises(SystemExit) as done:
            parse_args(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert parse_args(["--skip-bad-lines", "false"]).skip_bad_lines is False


def test_targets_gold_keeps_the_answers_and_mixed_draws_captions_counts_and_replies(synthetic_data):
    items = load_seed(synthetic_data / "train.jsonl")[:8]
    assert sft_examples(items, random.Random(0), targets="gold", caption_share=1.0, count_share=0.0) == (
        items,
        [it["answer"] for it in items],
    )
    captions, replies = sft_examples(items, random.Random(0), targets="mixed", caption_share=1.0, count_share=0.0)
    assert {it["question"] for it in captions} == {DESCRIBE_QUESTION}
    assert all(r.startswith("I see") for r in replies)
    counts, replies = sft_examples(items, random.Random(0), targets="mixed", caption_share=0.0, count_share=1.0)
    assert all(it["question"].startswith("How many") for it in counts)
    plain, _ = sft_examples(items, random.Random(0), targets="mixed", caption_share=0.0, count_share=0.0)
    assert [it["question"] for it in plain] == [it["question"] for it in items]
