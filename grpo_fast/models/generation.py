"""Completions, greedy or sampled row by row with seeded generators, ending at EOS: one path for every caller.

`generate_completions` is the one generation path: the trainer's rollouts and evaluation and SFT's sampled val
reward all go through it, so every completion skips the same special tokens and ends the same way.

Sampling: `SeededSampler` applies temperature, top-k and top-p and draws one token per row by inverse-CDF sampling
with the row's own generator, one uniform per row and step. A row's completion then depends only on its seed, not
on which rows share its batch or its process.

Two engines, the same tokens up to float rounding (on the tiny model, fp32 and bf16: the same tokens):
- `StaticDecoder` (InternVL with a Qwen2 text model, one process): prefills the whole prompts with the model's
  forward, copies the KV cache into buffers preallocated for the whole completion, then runs each decode step
  straight through the text model's weights (q/k/v and gate/up each one matmul, one SDPA call, a group's prompt
  columns read once for its rows), samples with `SeededSampler.pick` and stops when every row has ended. At the tiny model's size a step of HF
  `generate` is mostly Python and dispatch (logits processors, cache objects, masks, stopping criteria): about 340
  aten ops a step there, 170 here.
- HF `generate` with `SeededSampler` as a logits processor (it returns logits with all the mass on the drawn token,
  and generate's argmax picks it), for what the loop does not cover: `synced` (a sharded model's forward is a
  collective that every rank must keep calling, and FSDP unshards on module hooks the loop bypasses), Qwen-VL (its
  3-D rope positions are derived inside generate), other text models or attention implementations, other logits
  processors, and batches whose rows share images without being whole groups.

Groups (a batch of `collate(..., repeats=G)`): each image is encoded once and each group's prompt prefilled once
for one row, its KV cache repeated for the G rows (`prefill_groups`): the cache every row would have built itself.
Qwen-VL keeps generate's own prefill of every row, with the shared image features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from grpo_fast.models.inputs import Batch, group_size, image_features, prefill_groups


class SeededSampler(LogitsProcessor):
    """Samples row i with `generators[i]` after temperature / top-k / top-p. As a logits processor it returns 0 at
    the pick and -inf elsewhere; `pick` is the same draw for a decode loop, with the uniforms drawn ahead."""

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def uniforms(self, steps: int) -> torch.Tensor:
        """[B, steps] float32: each row's next `steps` draws, the values `steps` successive calls would use."""
        return torch.stack([torch.rand(steps, generator=g) for g in self.generators])

    def pick(self, scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[B] long: the token each row draws from `scores [B, V]` with its uniform `u [B]`."""
        logits = scores.float() / self.temperature  # [B, V]
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p < 1.0:
            # keep the smallest set of likeliest tokens whose mass reaches top_p (the first token always stays)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.masked_fill(drop_sorted.scatter(1, order, drop_sorted), 0.0)
        cdf = probs.cumsum(dim=-1)
        # first index whose cdf exceeds u * mass: never a zero-probability token
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picks = self.pick(scores, self.uniforms(1).squeeze(1))
        return torch.full_like(scores, -float("inf")).scatter_(1, picks.unsqueeze(1), 0.0)


def suppressed_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens a completion must never hold (image placeholders, chat markers, pad): all but EOS. An image
    token sampled into a completion would make the prompt + completion forward see more image slots than images."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(special - {tokenizer.eos_token_id})


@dataclass
class Completions:
    """Generated completions: `ids [B, C]` (pad after the end), `mask [B, C]` (1 up to and including EOS)."""

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Qwen2RMSNorm `norm` applied to `x` in one call (the module dispatches six ops from Python)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


@dataclass
class _Layer:
    """One decoder layer, its q/k/v and gate/up projections stacked (one matmul each) and its KV buffers."""

    module: torch.nn.Module  # Qwen2DecoderLayer
    qkv_weight: torch.Tensor  # [(heads + 2 kv heads) x head dim, D]
    qkv_bias: torch.Tensor  # [(heads + 2 kv heads) x head dim]
    gate_up_weight: torch.Tensor  # [2 x intermediate, D]
    keys: torch.Tensor  # [B / S, kv heads, T, head dim]
    values: torch.Tensor  # [B / S, kv heads, T, head dim]
    new_keys: torch.Tensor  # the completion columns as [B / S, kv heads, S, steps, head dim] (views of the above)
    new_values: torch.Tensor


class StaticDecoder:
    """Decode steps of an InternVL model with a Qwen2 text model over a preallocated KV cache.

    The prompts are prefilled by the model's own forward (a group's prompt once, `prefill_groups`), which gives the
    logits of the first completion token (`logits [B, V]` float32); each `step` feeds one token per row and returns
    the next logits. Positions count from each row's first real token, as generate's. The projections and norms are
    the model's weights, q/k/v and gate/up stacked into one matmul each (a transient copy of those weights).

    KV buffers: S rows share one (S = G for a batch of groups in fp32, else 1), `[B / S, kv heads, T, head dim]` with
    T = P + S x `steps`: the group's prompt once, then each row's completion columns (row j's token t at column
    P + j x steps + t), written in place. Attention is one SDPA call per layer on the kv heads' stacked queries (the
    S rows' heads in one block of S x heads / kv heads queries); `attend [B / S, 1, S x heads / kv heads, T]` masks
    the prompts' padding, the other rows' columns and the columns not yet written. A row reads its prompt once per
    group instead of once per row: at the tiny default the attention is half a step, mostly reading the buffers, and
    sharing makes steps ~20% faster. In bf16 (weights or autocast) each row keeps its own buffer (S = 1) and attends
    over the columns written so far: then it is HF's own SDPA call on the same values, the same logits to the bit;
    a shared block or a hand-written softmax(q k^T) v rounds bf16 probabilities differently and flipped a fifth to a
    quarter of bf16 rows. In fp32 either layout differs from HF's by ~1e-7."""

    def __init__(self, model: torch.nn.Module, batch: Batch, steps: int) -> None:
        self.text, self.head = model.get_decoder(), model.get_output_embeddings()
        width, group = batch.prompt_ids.shape[1], group_size(batch)
        prefill = prefill_groups(model, batch, group, width=width)
        self.logits = prefill.logits[:, -1].float().repeat_interleave(group, 0)
        device, dtype = self.logits.device, prefill.cache.layers[0].keys.dtype
        fp32 = dtype == torch.float32 and not torch.is_autocast_enabled(device.type)
        self.share, self.steps, self.prompt, self.t = group if fp32 else 1, steps, width, 0
        self.layers = []
        for module, cache in zip(self.text.layers, prefill.cache.layers, strict=True):
            attn, mlp = module.self_attn, module.mlp
            k, v = cache.keys[:: self.share], cache.values[:: self.share]  # [B / S, kv heads, P, head dim]
            keys, values = (x.new_zeros(*x.shape[:2], width + self.share * steps, x.shape[3]) for x in (k, v))
            keys[:, :, :width], values[:, :, :width] = k, v
            new_keys, new_values = (x[:, :, width:].unflatten(2, (self.share, steps)) for x in (keys, values))
            qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.layers.append(_Layer(module, qkv_weight, qkv_bias, gate_up_weight, keys, values, new_keys, new_values))
        self.heads = self.text.config.num_attention_heads
        _, self.kv_heads, _, self.dim = self.layers[0].keys.shape
        # the mask once every column is written; a step keeps the columns of completion steps <= its own
        per_row = self.heads // self.kv_heads
        own = torch.eye(self.share, dtype=torch.bool, device=device).repeat_interleave(per_row, 0)  # [S x h/kv, S]
        prompt = batch.prompt_mask[:: self.share].to(device).bool()[:, None, None, :]  # [B / S, 1, 1, P]
        self.attend = torch.cat(
            [
                prompt.expand(-1, 1, self.share * per_row, -1),
                own.repeat_interleave(steps, 1).expand(prompt.shape[0], 1, -1, -1),
            ],
            dim=-1,
        )
        column = torch.arange(self.share * steps, device=device) % steps
        self.column_step = torch.cat([column.new_full((width,), -1), column])  # [T]: -1 on the prompt
        # rope of completion token j at position (prompt length + j): [B, steps, head dim], in the embeddings'
        # dtype; the sign of rotate_half folded into sin (rotate_half(x) * sin == swapped halves * signed sin)
        positions = batch.prompt_mask.to(device).sum(1, keepdim=True) + torch.arange(steps, device=device)
        self.cos, sin = self.text.rotary_emb(self.text.embed_tokens.weight, positions)
        half = self.dim // 2
        self.sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """InternVL (-hf) with a Qwen2 text model: SDPA attention, full attention layers, default rope, and plain
        `nn.Linear` projections (the loop reads their weights: LoRA adapters or quantized layers would be skipped)."""
        config = model.config
        if not (
            config.model_type == "internvl"
            and config.text_config.model_type == "qwen2"
            and config.text_config._attn_implementation == "sdpa"  # the attention the loop runs
            and all(kind == "full_attention" for kind in config.text_config.layer_types)
            and config.text_config.rope_parameters["rope_type"] == "default"
        ):
            return False
        attention, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        return all(
            type(getattr(part, name)) is torch.nn.Linear
            for layer in model.get_decoder().layers
            for part, names in ((layer.self_attn, attention), (layer.mlp, mlp))
            for name in names
        )

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds `tokens [B]` (long) at the next column; returns the next logits `[B, V]` float32."""
        rows, heads, kv_heads, dim, share = tokens.shape[0], self.heads, self.kv_heads, self.dim, self.share
        blocks = rows // share
        end = self.prompt + (share - 1) * self.steps + self.t + 1  # past the last column written
        attend = (self.attend[..., :end] & (self.column_step[:end] <= self.t)).contiguous()
        cos, sin = self.cos[:, self.t, None], self.sin[:, self.t, None]  # [B, 1, head dim]
        x = self.text.embed_tokens(tokens)  # [B, D]
        for layer in self.layers:
            attn, mlp = layer.module.self_attn, layer.module.mlp
            qkv = F.linear(_rms_norm(layer.module.input_layernorm, x), layer.qkv_weight, layer.qkv_bias)
            qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)  # q and k heads: one rope
            qk = qk * cos + qk.view(rows, heads + kv_heads, 2, dim // 2).flip(2).view_as(qk) * sin
            layer.new_keys[..., self.t, :] = qk[:, heads:].view(blocks, share, kv_heads, dim).transpose(1, 2)
            v = qkv[:, (heads + kv_heads) * dim :].view(blocks, share, kv_heads, dim)
            layer.new_values[..., self.t, :] = v.transpose(1, 2)
            # a kv head's query heads are consecutive (HF's repeat_kv), the S rows' after one another:
            # [B / S, kv heads, S x heads / kv heads, head dim]
            q = qk[:, :heads].view(blocks, share, kv_heads, -1, dim).transpose(1, 2).flatten(2, 3)
            keys, values = layer.keys[:, :, :end], layer.values[:, :, :end]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=attn.scaling)
            out = out.unflatten(2, (share, -1)).transpose(1, 2).reshape(rows, heads * dim)
            x = x + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            gate, up = F.linear(_rms_norm(layer.module.post_attention_layernorm, x), layer.gate_up_weight).chunk(2, -1)
            x = x + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        self.t += 1
        return self.head(_rms_norm(self.text.norm, x)).float()


@torch.inference_mode()  # ~10% less dispatch per op than no_grad; the masking after it makes normal tensors
def _decode(
    model: torch.nn.Module, batch: Batch, tokenizer: PreTrainedTokenizerBase, steps: int, sampler: SeededSampler | None
) -> torch.Tensor:
    """`[B, C]` tokens of `StaticDecoder` steps, greedy or drawn by `sampler`, special tokens suppressed (pad after a
    row's EOS; C <= steps, fewer when every row has ended)."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    decoder = StaticDecoder(model, batch, steps)
    logits = decoder.logits
    blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    blocked[suppressed_ids(tokenizer)] = True
    u = sampler.uniforms(steps).to(logits.device) if sampler is not None else None
    ids = torch.full((logits.shape[0], steps), pad_id, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for t in range(steps):
        scores = logits.masked_fill(blocked, -float("inf"))
        token = scores.argmax(-1) if sampler is None else sampler.pick(scores, u[:, t])
        ids[:, t] = token.masked_fill(done, pad_id)
        done |= ids[:, t] == eos_id
        if t + 1 == steps or bool(done.all()):
            return ids[:, : t + 1]
        logits = decoder.step(ids[:, t])
    return ids


def _hf_generate(
    model: torch.nn.Module,
    batch: Batch,
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    processor: LogitsProcessor | None,
    synced: bool,
) -> torch.Tensor:
    """`[B, C]` tokens of HF `generate`, greedy on top of `processor`, special tokens suppressed (pad after a row's
    EOS; C <= steps)."""
    config = GenerationConfig(
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=suppressed_ids(tokenizer),
        use_cache=True,
    )
    param = next(model.parameters())
    shared = batch.image_index is not None
    inputs: dict = {k: v.to(param.device) for k, v in batch.prompt_inputs(pixels=not shared).items()}
    if not shared:
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    elif batch.image_grid_thw is None and (group := group_size(batch)) > 1:
        inputs["cache"] = prefill_groups(model, batch, group, width=batch.prompt_ids.shape[1] - 1).cache
    else:
        inputs["mm_encoder_outputs"] = {"image": image_features(model, batch)}
    out = model.generate(
        **inputs,
        generation_config=config,
        logits_processor=LogitsProcessorList([processor] if processor is not None else []),
        synced_gpus=synced,
    )
    return out[:, batch.prompt_ids.shape[1] :]


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    batch: Batch,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    logits_processor: LogitsProcessor | None = None,
    synced: bool = False,
) -> Completions:
    """Completions for the prompts of `batch`: greedy, or sampled when `logits_processor` is a sampler such as
    `SeededSampler`. `synced` keeps every rank decoding until all are done (a sharded model's forward is a
    collective). `StaticDecoder` runs when it can (see the module docstring), HF `generate` otherwise."""
    sampled = isinstance(logits_processor, SeededSampler)
    if (
        StaticDecoder.supports(model)
        and not synced
        and (logits_processor is None or sampled)
        and (batch.image_index is None or group_size(batch) > 1)
    ):
        ids = _decode(model, batch, tokenizer, max_new_tokens, logits_processor if sampled else None)
    else:
        ids = _hf_generate(model, batch, tokenizer, max_new_tokens, logits_processor, synced)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = ids.cpu()
    is_eos = ids == eos_id
    # position of the first EOS (C when there is none); the mask keeps tokens up to and including it
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return Completions(ids=ids, mask=mask, truncated=~is_eos.any(1))
