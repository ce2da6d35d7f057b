"""`generate_completions`' decode loop (`StaticDecoder`) against HF `generate` with `SeededSampler` as its logits
processor: the same completions row for row (greedy and sampled, a group's prompt prefilled once or every row its
own, rows that end at EOS, rows truncated, suppressed special tokens), and the loop's log-probs against the model's
forward over prompt + completion."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from grpo_fast.data import load_seed
from grpo_fast.models.generation import SeededSampler, StaticDecoder, generate_completions, suppressed_ids
from grpo_fast.models.inputs import collate

G, PROMPTS, STEPS = 4, 8, 16
MAX_MISMATCH = 0.01  # share of rows whose completion may differ (a float-rounding flip of one draw)
SAMPLERS = {
    "greedy": None,
    "t0.7": (0.7, 0, 1.0),
    "t1-top_k20-top_p0.9": (1.0, 20, 0.9),
}


@pytest.fixture(scope="module")
def items(synthetic_data):
    return load_seed(synthetic_data / "train.jsonl")[:PROMPTS]


def _model(tiny_policy, bias: dict[int, float]) -> torch.nn.Module:
    """The tiny model in eval mode with an lm_head bias of `bias[token]` (to make it end at EOS or want a
    suppressed token); the tied weights copied into a head of its own."""
    model = copy.deepcopy(tiny_policy.model).eval()
    weight = model.lm_head.weight
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
        model.lm_head.bias.zero_()
        for token, value in bias.items():
            model.lm_head.bias[token] = value
    return model


def _sampler(name: str, rows: int) -> SeededSampler | None:
    return None if SAMPLERS[name] is None else SeededSampler(list(range(100, 100 + rows)), *SAMPLERS[name])


def _hf_reference(model, batch, tok, sampler) -> torch.Tensor:
    """`[B, STEPS]` completions of HF generate on the per-row layout (every row its own image, generate's own
    prefill), greedy on top of `sampler`, special tokens suppressed; pad after EOS (generate's own padding)."""
    out = model.generate(
        **batch.prompt_inputs(),
        max_new_tokens=STEPS,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        suppress_tokens=suppressed_ids(tok),
        logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
    )
    ids = out[:, batch.prompt_ids.shape[1] :]
    return F.pad(ids, (0, STEPS - ids.shape[1]), value=tok.pad_token_id)


# (layout, sampling, head): every layout and sampler on a head whose rows partly end at EOS, then the other heads
CASES = [(layout, sampling, "eos") for layout in ("groups", "rows") for sampling in SAMPLERS] + [
    ("groups", "t0.7", "random"),
    ("rows", "greedy", "random"),
    ("groups", "greedy", "eos_all"),
    ("rows", "t1-top_k20-top_p0.9", "eos_all"),
    ("groups", "t0.7", "special"),
    ("rows", "greedy", "special"),
]


@pytest.fixture(scope="module")
def heads(tiny_policy):
    """Biased heads by name: the tiny model's own, EOS likelier (some rows end) or far likelier (all end), every
    suppressed token the likeliest."""
    tok = tiny_policy.tokenizer
    biases = {
        "random": {},
        "eos": {tok.eos_token_id: 1.0},
        "eos_all": {tok.eos_token_id: 5.0},
        "special": dict.fromkeys(suppressed_ids(tok), 20.0),
    }
    return {name: _model(tiny_policy, bias) for name, bias in biases.items()}


@pytest.fixture(scope="module")
def references(tiny_policy, items, heads):
    """HF generate's completions of the per-row layout, by (sampling, head), computed once."""
    per_row = collate(tiny_policy, [it for it in items for _ in range(G)])
    cache = {}

    def get(sampling: str, head: str) -> torch.Tensor:
        if (sampling, head) not in cache:
            sampler = _sampler(sampling, per_row.prompt_ids.shape[0])
            cache[sampling, head] = _hf_reference(heads[head], per_row, tiny_policy.tokenizer, sampler)
        return cache[sampling, head]

    return get


@pytest.mark.parametrize("layout, sampling, head", CASES)
def test_decode_loop_samples_what_hf_generate_does(tiny_policy, items, heads, references, layout, sampling, head):
    tok, model = tiny_policy.tokenizer, heads[head]
    assert StaticDecoder.supports(model)
    if layout == "groups":
        batch = collate(tiny_policy, items, repeats=G)
    else:
        batch = collate(tiny_policy, [it for it in items for _ in range(G)])
    rows = batch.prompt_ids.shape[0]
    out = generate_completions(model, batch, tok, max_new_tokens=STEPS, logits_processor=_sampler(sampling, rows))
    ref = references(sampling, head)

    ids = F.pad(out.ids, (0, STEPS - out.ids.shape[1]), value=tok.pad_token_id)
    mismatch = (ids != ref).any(1).float().mean().item()
    assert mismatch <= MAX_MISMATCH, f"{mismatch:.1%} of the rows differ from HF generate"
    ended = (ref == tok.eos_token_id).any(1)
    assert torch.equal(out.truncated, ~ended) or mismatch > 0
    assert not torch.isin(out.ids[out.mask.bool()], torch.tensor(suppressed_ids(tok))).any()  # pad only after
    assert not out.ids.is_inference()  # the trainer's forward saves the ids for backward
    # each case exercises what it is for
    if head == "eos":
        assert out.truncated.any() and not out.truncated.all()
    elif head == "eos_all":
        assert not out.truncated.any() and out.ids.shape[1] < STEPS  # the loop stopped early
    else:
        assert out.truncated.all() and out.ids.shape[1] == STEPS
    if sampling != "greedy" and head != "eos_all":
        assert len({tuple(r) for r in out.ids.tolist()}) > PROMPTS  # a group's members sampled apart


@pytest.mark.parametrize("precision", ["bf16 weights", "bf16 autocast"])
def test_decode_loop_samples_what_hf_generate_does_in_bf16(tiny_policy, items, heads, precision):
    """In bf16 the attention's rounding shows in the draws: the loop gives every row its own KV buffer and runs SDPA
    as HF's attention does, on the same values, so it still samples HF's completions (the rollout's autocast; or a
    model loaded in bf16)."""
    tok = tiny_policy.tokenizer
    model = copy.deepcopy(heads["eos"]).to(torch.bfloat16) if precision == "bf16 weights" else heads["eos"]
    batch = collate(tiny_policy, items, repeats=G)
    per_row = collate(tiny_policy, [it for it in items for _ in range(G)])
    rows = batch.prompt_ids.shape[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
        out = generate_completions(model, batch, tok, max_new_tokens=STEPS, logits_processor=_sampler("t0.7", rows))
        ref = _hf_reference(model, per_row, tok, _sampler("t0.7", rows))
    ids = F.pad(out.ids, (0, STEPS - out.ids.shape[1]), value=tok.pad_token_id)
    mismatch = (ids != ref).any(1).float().mean().item()
    assert mismatch <= MAX_MISMATCH, f"{mismatch:.1%} of the rows differ from HF generate"
    assert out.truncated.any() and not out.truncated.all()


@pytest.mark.parametrize("layout", ["groups", "rows"])
def test_decode_loop_log_probs_equal_the_forward_over_prompt_and_completion(tiny_policy, items, heads, layout):
    """Teacher-forced through `StaticDecoder.step`, the sampled completions (some ended at EOS) get the log-probs
    that the model's forward over prompt + completion gives them, to fp32 rounding."""
    tok, model = tiny_policy.tokenizer, heads["eos"]
    batch = collate(tiny_policy, items, repeats=G) if layout == "groups" else collate(tiny_policy, items)
    rows, width = batch.prompt_ids.shape
    out = generate_completions(model, batch, tok, max_new_tokens=STEPS, logits_processor=_sampler("t0.7", rows))
    assert out.truncated.any() and not out.truncated.all()
    columns = out.ids.shape[1]
    with torch.no_grad():
        decoder = StaticDecoder(model, batch, columns)
        assert decoder.share == (G if layout == "groups" else 1)  # fp32 groups share their prompt's KV columns
        logits = [decoder.logits] + [decoder.step(out.ids[:, j].clone()) for j in range(columns - 1)]
        batch.completion_ids, batch.completion_mask = out.ids, out.mask
        forward = model(**batch.model_inputs()).logits[:, width - 1 : width - 1 + columns]
    ours = torch.stack(logits, 1).log_softmax(-1).gather(-1, out.ids.unsqueeze(-1)).squeeze(-1)
    theirs = forward.float().log_softmax(-1).gather(-1, out.ids.unsqueeze(-1)).squeeze(-1)
    real = out.mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_uniforms_drawn_ahead_pick_what_the_logits_processor_picks():
    """The decode loop draws every step's uniforms at once; the logits processor draws one per call: the same
    values, so the same tokens (top-k and top-p included)."""
    scores = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    ahead, called = SeededSampler(list(range(5)), 0.8, 10, 0.9), SeededSampler(list(range(5)), 0.8, 10, 0.9)
    u = ahead.uniforms(7)
    assert u.shape == (5, 7) and len({tuple(r) for r in u.tolist()}) == 5
    for j in range(7):
        assert torch.equal(ahead.pick(scores, u[:, j]), called(None, scores).argmax(1))


def test_other_logits_processors_go_through_hf_generate(tiny_policy, items):
    """A processor the loop does not know (here one that forces a token) is applied by HF generate."""

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.full_like(scores, -float("inf")).index_fill_(1, torch.tensor([7]), 0.0)

    batch = collate(tiny_policy, items[:2], repeats=G)
    out = generate_completions(
        tiny_policy.model.eval(), batch, tiny_policy.tokenizer, max_new_tokens=3, logits_processor=Force()
    )
    assert (out.ids == 7).all()


def test_lora_adapters_keep_hf_generate(tiny_policy):
    """The loop reads the projections' weights, so a model whose projections carry LoRA adapters is not its case
    (it would sample from the base weights)."""
    peft = pytest.importorskip("peft")
    assert StaticDecoder.supports(tiny_policy.model)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lora = peft.get_peft_model(copy.deepcopy(tiny_policy.model), config)
    assert not StaticDecoder.supports(lora)
