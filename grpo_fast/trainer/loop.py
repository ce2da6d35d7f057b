"""The GRPO loop: rollout -> reward -> advantage -> clipped, KL-regularised loss -> update.

GRPO (DeepSeekMath, arXiv:2402.03300) with TRL's knobs. Each step:
1. rollout: this rank's prompts of the global batch, G completions each (`grpo_fast.models.generation`: KV
   cache, stop at EOS, temperature / top-k / top-p with per-row seeded generators, see `trainer.rollout`);
2. reward: every reward function `(prompts, completions, **columns) -> list[float | None]` (None: unscorable);
3. advantage: rewards gathered over ranks, `group_advantages` over whole groups (weighted sum over functions);
   with mask_zero_std_groups, the groups whose rewards are all equal leave the later phases (`Rollout.trained`);
4. old log-probs (when num_iterations > 1) and reference log-probs (when beta > 0) with `fused_linear_logprobs`;
5. num_iterations updates, each: `fused_linear_grpo_loss` on the policy's last hidden states and lm_head (never
   full logits) for every micro-batch, gradients summed over micro-batches and ranks, clipped, AdamW, schedule.

Losses are normalised by global counts (tokens for dapo/bnpo/cispo/vespo, sequences for grpo/dr_grpo/sapo/luspo,
over micro-batches and ranks), so N processes on a global batch compute the update one process would. The
top-entropy mask and the adaptive entropy coefficient are in `trainer.entropy`. A group's G rows share one prompt
and image, which every phase computes once per group (`completion_hidden`, `grpo_fast.models.inputs`); each
step's StepStats holds the seconds of each phase (time/generate, time/reward, time/logprobs, time/update).

    python -m grpo_fast.train                     # tiny default: synthetic data, SFT warm start, GRPO, table
    torchrun --nproc_per_node=2 -m grpo_fast.train --batch-size 16
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from grpo_fast.config import ConfigError, GRPOConfig, save_yaml
from grpo_fast.distributed import (
    DistEnv,
    all_gather_cat,
    all_sum,
    barrier,
    clip_grad_norm,
    full_state,
    full_weights,
    load_full_state,
    sum_gradients,
)
from grpo_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages
from grpo_fast.kernels.reference import weighted_reward_sum
from grpo_fast.models.generation import Completions, SeededSampler, generate_completions
from grpo_fast.models.inputs import Batch, collate, group_size, image_features, prefill_groups
from grpo_fast.models.policy import Policy
from grpo_fast.rewards.judge import Judge, JudgeReward
from grpo_fast.schedule import lr_factor
from grpo_fast.trainer.entropy import EntropyControl, global_entropy_mask
from grpo_fast.trainer.evaluation import evaluate, format_table
from grpo_fast.trainer.faults import crash_point
from grpo_fast.trainer.precision import has_flash_attn, resolve_precision
from grpo_fast.trainer.rollout import Rollout, row_seed, sample_records
from grpo_fast.trainer.run_dir import RunLog, latest_checkpoint, load_trainer_state, save_checkpoint

RewardFn = Callable[..., list[float | None]]


class UnscorableError(RuntimeError):
    """Too many steps in a row had most of their completions unscorable: the run would train on no signal."""


@dataclass
class StepStats:
    """What one step reports (means over the global batch; loss metrics over its tokens and iterations)."""

    step: int
    reward: float  # over the scorable completions (unscorable ones left out, as in eval/reward)
    reward_std: float  # mean within-group std (scorable completions)
    frac_reward_zero_std: float  # groups whose rewards are all equal, or with fewer than two scorable (no signal)
    frac_unscorable: float  # completions no reward function could score (the judge's replies never parsed, ...)
    completion_length: float
    truncated: float
    loss: float
    kl: float
    entropy: float
    clip_ratio: float  # share of tokens clipped (region)
    grad_norm: float
    lr: float
    step_time: float
    entropy_coef: float = 0.0  # the entropy bonus's coefficient after the step (it moves when adaptive)
    # this rank's seconds in each phase of the step, summed over micro-batches (and iterations for the update):
    time_generate: float = 0.0  # prompts (image tiling) and sampling the completions
    time_reward: float = 0.0  # reward functions and advantages
    time_logprobs: float = 0.0  # old and reference log-probs
    time_update: float = 0.0  # loss forwards and backwards, gradient sums, clipping, optimizer steps

    def record(self) -> dict[str, float]:
        """The metrics.jsonl record: every field, the time_* ones as time/generate, time/reward, ..."""
        return {k.replace("time_", "time/", 1) if k.startswith("time_") else k: v for k, v in asdict(self).items()}

    def time_split(self) -> str:
        """The progress bar's compact phase split: "g1.0 r0.1 lp0.2 u0.5" (generate, reward, logprobs, update)."""
        parts = zip(("g", "r", "lp", "u"), (self.time_generate, self.time_reward, self.time_logprobs, self.time_update))
        return " ".join(f"{name}{seconds:.1f}" for name, seconds in parts)


def nan_std(groups: torch.Tensor) -> torch.Tensor:
    """The unbiased std of each row of `groups [n, G]` over its non-NaN entries (0 with fewer than two) -> `[n]`."""
    valid = ~groups.isnan()
    count = valid.sum(dim=1)
    centered = torch.where(valid, groups - groups.nanmean(dim=1, keepdim=True), 0.0)
    return torch.where(count > 1, (centered.square().sum(dim=1) / (count - 1).clamp(min=1)).sqrt(), 0.0)


def zero_std_groups(total: torch.Tensor, group: int) -> torch.Tensor:
    """`[B / G]` True for each group of `total [B]` (weighted rewards, NaN = unscorable) whose rewards are all equal,
    or with fewer than two scorable: its advantages carry no signal."""
    return nan_std(total.view(-1, group)) < 1e-6


def judge_metrics(judge: Judge, env: DistEnv) -> dict[str, float]:
    """The judge's `judge/*` counters since the previous call (training steps and evaluations alike), summed over
    the ranks, each of which asks for its own completions; {} for a judge without counters. A collective."""
    if not hasattr(judge, "metrics"):
        return {}
    local = judge.metrics()
    return dict(zip(local, all_sum(torch.tensor(list(local.values()), dtype=torch.float64), env).tolist()))


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_output_embeddings()


def completion_hidden(
    model: torch.nn.Module, batch: Batch, device: torch.device, *, share_prompt: bool = True
) -> torch.Tensor:
    """Last hidden states `[B, C, D]` at the positions that predict each completion token (shifted by one).

    Through the whole model's forward (logits of one position only, `[B, 1, V]`), not its backbone's: under FSDP2
    the root's forward is what gathers the root unit's weights, the lm_head's among them. A batch of groups
    (`image_index`) has each image encoded once and its features shared by the group's rows (`image_features`);
    an InternVL batch of whole groups also runs each group's prompt once (`grouped_completion_hidden`) unless
    `share_prompt` is False (gradient checkpointing: its recomputation would append to the shared KV cache again)."""
    shared = batch.image_index is not None
    if share_prompt and batch.image_grid_thw is None and (group := group_size(batch)) > 1:
        return grouped_completion_hidden(model, batch, group)
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.model_inputs(pixels=not shared).items()}
    if shared:
        inputs["mm_encoder_outputs"] = {"image": image_features(model, batch)}
    else:
        inputs["pixel_values"] = inputs["pixel_values"].to(lm_head(model).weight.dtype)
    hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    prompt, width = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return hidden[:, prompt - 1 : prompt - 1 + width]


def grouped_completion_hidden(model: torch.nn.Module, batch: Batch, group: int) -> torch.Tensor:
    """`completion_hidden` of an InternVL batch of whole groups (`group` rows repeating one prompt), with the prompt
    run once per group: its hidden state at the last prompt position and its KV cache (repeated for the rows) feed
    a second forward over the completions alone. Causal attention makes this the same computation as the full
    forward of every row (up to float rounding); under autograd the rows' gradients sum into the one prompt pass.
    `[B, C, D]`; about (G - 1) / G of the prompt tokens' work is saved."""
    prompt, width = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    head = prefill_groups(model, batch, group, width=prompt, output_hidden_states=True)
    last = head.hidden_states[-1][:, -1:].repeat_interleave(group, 0)  # [B, 1, D]: predicts completion token 0
    if width == 1:
        return last
    device = last.device
    rest = model(
        input_ids=batch.completion_ids[:, :-1].to(device),
        attention_mask=batch.attention_mask[:, : prompt + width - 1].to(device),
        position_ids=batch.position_ids[:, prompt : prompt + width - 1].to(device),
        cache=head.cache,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    ).hidden_states[-1]  # [B, C - 1, D]
    return torch.cat([last, rest], dim=1)


class GRPOTrainer:
    """Runs GRPO steps on `policy`; `reward_funcs` default to the judge's rubric reward."""

    def __init__(
        self,
        cfg: GRPOConfig,
        policy: Policy,
        train_items: Sequence[dict[str, Any]],
        env: DistEnv,
        *,
        judge: Judge | None = None,
        reward_funcs: Sequence[RewardFn] | None = None,
        reward_weights: Sequence[float] | None = None,
        ref_model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg, self.policy, self.items, self.env = cfg, policy, list(train_items), env
        self.reward_funcs = list(reward_funcs) if reward_funcs else [JudgeReward(judge)]
        weights = reward_weights if reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward weights for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        if cfg.beta > 0 and ref_model is None and not hasattr(policy.model, "disable_adapter"):
            raise ValueError("beta > 0 needs a reference: pass ref_model, or train LoRA adapters (their base is it)")
        self.ref_model = ref_model
        self.precision = resolve_precision(env.device.type, cfg.bf16, has_flash_attn(), cfg.attn_implementation,
                                           cfg.cast_lm_head_to_fp32)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        schedule = partial(
            lr_factor,
            total=cfg.max_steps * cfg.num_iterations,
            warmup=cfg.warmup_steps,
            kind=cfg.lr_scheduler_type,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0  # steps completed
        self._perms: dict[int, list[int]] = {}
        self.entropy = EntropyControl.from_config(cfg)
        self.times = dict.fromkeys(("generate", "reward", "logprobs", "update"), 0.0)  # this step's, see StepStats

    def lap(self, phase: str, start: float) -> None:
        """Adds the wall seconds since `start` (perf_counter) to `self.times[phase]`, once the device's queued work
        has finished."""
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        self.times[phase] += time.perf_counter() - start

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the block's wall seconds to `self.times[phase]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.lap(phase, start)

    # -- data --------------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {
                epoch: random.Random(f"{self.cfg.seed}/epoch/{epoch}").sample(range(len(self.items)), len(self.items))
            }
        return self._perms[epoch]

    def prompt_slots(self, step: int, micro: int) -> range:
        """Global prompt slots of this rank's share of micro-batch `micro` of `step` (slot k -> item order[k % n])."""
        per_rank = self.cfg.prompts_per_batch
        first = (step * self.cfg.gradient_accumulation_steps + micro) * per_rank * self.env.world
        return range(first + self.env.rank * per_rank, first + (self.env.rank + 1) * per_rank)

    def prompts(self, step: int, micro: int) -> list[dict[str, Any]]:
        n = len(self.items)
        return [self.items[self._order(k // n)[k % n]] for k in self.prompt_slots(step, micro)]

    # -- rollout -> reward -> advantage --------------------------------------------------------------------------

    def rollout(self, step: int, micro: int) -> Rollout:
        cfg, tok, G = self.cfg, self.policy.tokenizer, self.cfg.num_generations
        prompts = self.prompts(step, micro)
        items = [item for item in prompts for _ in range(G)]
        with self.timed("generate"):
            batch = collate(self.policy, prompts, repeats=G)  # a group's G rows share one copy of its image
        longest = int(batch.prompt_mask.sum(1).max())
        if cfg.max_prompt_length is not None and longest > cfg.max_prompt_length:
            raise ConfigError(
                f"a prompt has {longest} tokens (image tokens included) > max_prompt_length "
                f"{cfg.max_prompt_length}: raise it or lower the image's tile count"
            )
        # within-step global row: micro-batches, then ranks, then prompts, then the G members
        first_row = (micro * self.env.world * cfg.prompts_per_batch + self.env.rank * cfg.prompts_per_batch) * G
        seeds = [row_seed(cfg.seed, step, first_row + i) for i in range(len(items))]
        sampler = SeededSampler(seeds, cfg.temperature, cfg.top_k, cfg.top_p)
        self.policy.model.eval()
        with self.timed("generate"), self._autocast():
            out: Completions = generate_completions(
                self.policy.model,
                batch,
                tok,
                max_new_tokens=cfg.max_completion_length,
                logits_processor=sampler,
                synced=cfg.fsdp,
            )
        self.policy.model.train()
        texts = tok.batch_decode(out.ids, skip_special_tokens=True)
        batch.completion_ids = out.ids
        batch.completion_mask = (
            out.mask * (~out.truncated).long().unsqueeze(1) if cfg.mask_truncated_completions else out.mask
        )
        with self.timed("reward"):
            rewards = self.score(items, texts)
            advantages = self.compute_advantages(rewards)
        rows, train = self.signal_rows(rewards), batch
        if rows is not None and len(rows):
            train = batch.select(rows)
        elif rows is not None:  # no signal: a zero-mask group keeps this micro-batch's forward (and FSDP's) in step
            train = batch.select(torch.arange(G))
            train.completion_mask = torch.zeros_like(train.completion_mask)
        with self.timed("logprobs"):
            old_logp = self.logprobs(self.policy.model, train) if cfg.num_iterations > 1 else None
            ref_logp = self.reference_logprobs(train) if cfg.beta > 0 else None
        lengths = out.mask.sum(1)  # sampled tokens per completion
        return Rollout(
            items, batch, texts, rewards, advantages, old_logp, ref_logp, out.truncated, lengths, rows, train
        )

    def signal_rows(self, rewards: torch.Tensor) -> torch.Tensor | None:
        """With mask_zero_std_groups, the `[B']` rows (ascending) of the groups whose rewards differ, when some do
        not (a group's G rows sit in one micro-batch, so its rewards are all here); else None: every row trains."""
        if not self.cfg.mask_zero_std_groups:
            return None
        G = self.cfg.num_generations
        dead = zero_std_groups(weighted_reward_sum(rewards, self.reward_weights), G)
        if not dead.any():
            return None
        return (~dead).repeat_interleave(G).nonzero().squeeze(1)

    def score(self, items: list[dict[str, Any]], texts: list[str]) -> torch.Tensor:
        """`[B, K]` rewards of every function (TRL's call: prompts, completions, dataset columns); NaN = None."""
        keys = [k for k in items[0] if all(k in it for it in items)]
        columns = {k: [it[k] for it in items] for k in keys}
        prompts = [it["question"] for it in items]
        out = torch.full((len(texts), len(self.reward_funcs)), math.nan)
        for k, fn in enumerate(self.reward_funcs):
            values = fn(prompts, texts, **columns)
            out[:, k] = torch.tensor([math.nan if v is None else float(v) for v in values])
        return out

    def compute_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """This rank's `[B]` advantages, computed on the rewards of all ranks (whole groups, batch statistics)."""
        everything = all_gather_cat(rewards.to(self.env.device), self.env)  # group_advantages runs on their device
        aggregation = self.cfg.multi_objective_aggregation
        if everything.shape[1] == 1:
            adv = group_advantages(everything[:, 0], self.cfg.num_generations, scale=self.cfg.scale_rewards,
                                   multi_objective_aggregation=aggregation)
        else:
            adv = group_advantages(
                everything, self.cfg.num_generations, scale=self.cfg.scale_rewards,
                weights=self.reward_weights.to(everything.device), multi_objective_aggregation=aggregation,
            )
        b = rewards.shape[0]
        return adv[self.env.rank * b : (self.env.rank + 1) * b]

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """`[B, C]` log-probs of the completion tokens under `model` (chunked lm_head, no full logits)."""
        with self._autocast():
            hidden = completion_hidden(model, batch, self.env.device)
        head = lm_head(model)
        targets = batch.completion_ids.to(self.env.device)
        return fused_linear_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=self.cfg.temperature,
                                     compute_dtype=self.precision.lm_head_dtype)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        if self.ref_model is not None:
            return self.logprobs(self.ref_model, batch)
        with self.policy.model.disable_adapter():  # LoRA: the base model is the reference
            return self.logprobs(self.policy.model, batch)

    # -- loss -> update ------------------------------------------------------------------------------------------

    def loss(self, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's GRPO loss (normalised within the micro-batch, as the kernel defines it)."""
        cfg, dev = self.cfg, self.env.device
        batch, advantages = r.trained
        with self._autocast():
            hidden = completion_hidden(self.policy.model, batch, dev, share_prompt=not cfg.gradient_checkpointing)
        head = lm_head(self.policy.model)
        to = lambda t: None if t is None else t.to(dev)
        targets, mask = batch.completion_ids.to(dev), batch.completion_mask.to(dev)
        entropy = entropy_mask = None
        if cfg.top_entropy_quantile < 1.0:
            # the mask needs every token's entropy before the loss's single pass: one more lm_head pass, no grad
            with torch.no_grad():
                _, entropy = fused_linear_logprobs(hidden.detach(), head.weight, targets, bias=head.bias,
                                                   temperature=cfg.temperature, return_entropy=True,
                                                   compute_dtype=self.precision.lm_head_dtype)
            entropy_mask = global_entropy_mask(entropy, mask, cfg.top_entropy_quantile, self.env)
        loss, metrics = fused_linear_grpo_loss(
            hidden,
            head.weight,
            targets,
            old_logp=to(r.old_logp),
            ref_logp=to(r.ref_logp),
            advantages=advantages.to(dev),
            mask=mask,
            bias=head.bias,
            beta=cfg.beta,
            epsilon_low=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            delta=cfg.delta,
            loss_type=cfg.loss_type,
            importance_sampling_level=cfg.importance_sampling_level,
            temperature=cfg.temperature,
            compute_dtype=self.precision.lm_head_dtype,
            max_completion_length=cfg.max_completion_length,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
            vespo_k_pos=cfg.vespo_k_pos,
            vespo_lambda_pos=cfg.vespo_lambda_pos,
            vespo_k_neg=cfg.vespo_k_neg,
            vespo_lambda_neg=cfg.vespo_lambda_neg,
            off_policy_mask_threshold=cfg.off_policy_mask_threshold,
            entropy_coef=self.entropy.applied(),
            entropy_mask=entropy_mask,
        )
        if self.entropy.adaptive:
            # the controller's input: the entropy summed over the tokens the policy term acts on, and their count
            if entropy_mask is None:
                count = mask.sum().float()
                metrics["entropy_window"] = torch.stack([metrics["entropy"] * count, count])
            else:
                metrics["entropy_window"] = torch.stack([(entropy * entropy_mask).sum(), entropy_mask.sum().float()])
        return loss, metrics

    def loss_scales(self, rollouts: list[Rollout]) -> list[float]:
        """Per micro-batch factor turning its own normalisation into the global one: its share of the tokens
        (dapo, bnpo, cispo, vespo) or of the sequences (grpo, dr_grpo, sapo, luspo) of all micro-batches on all
        ranks."""
        trained = [r.trained[0] for r in rollouts]
        if self.cfg.loss_type in ("dapo", "bnpo", "cispo", "vespo"):
            counts = torch.tensor([float(b.completion_mask.sum()) for b in trained])
        else:  # the rows trained on (none when a micro-batch has no signal)
            counts = torch.tensor([float(len(r.items) if r.loss_rows is None else len(r.loss_rows)) for r in rollouts])
        total = float(all_sum(counts.sum(), self.env))
        return [float(c) / total if total > 0 else 0.0 for c in counts]

    def train_step(self) -> tuple[StepStats, list[Rollout]]:
        """One GRPO step (rollouts, then num_iterations updates); returns its stats and its rollouts."""
        cfg, start = self.cfg, time.perf_counter()
        self.times = dict.fromkeys(self.times, 0.0)
        rollouts = [self.rollout(self.step, m) for m in range(cfg.gradient_accumulation_steps)]
        scales = self.loss_scales(rollouts)
        crash_point("step")
        sums = torch.zeros(5)  # loss, kl, entropy, clip ratio (token-weighted) and grad norm, summed
        updating = time.perf_counter()
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            window = torch.zeros(2)  # the adaptive entropy control's entropy sum and token count
            for r, scale in zip(rollouts, scales):
                loss, metrics = self.loss(r)
                (loss * scale).backward()
                if "entropy_window" in metrics:
                    window += metrics["entropy_window"].detach().float().cpu()
                sums[:4] += scale * torch.stack(
                    [loss.detach().float().cpu()]
                    + [
                        metrics.get(k, torch.tensor(math.nan)).detach().float().cpu()
                        for k in ("kl", "entropy", "clip_ratio/region_mean")
                    ]
                )
            if not cfg.fsdp:  # FSDP2 has reduce-scattered (summed) them in the backward
                sum_gradients(self.params, self.env)
            sums[4] += clip_grad_norm(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.entropy.adaptive:
                total, count = all_sum(window, self.env).tolist()
                self.entropy.update(total / max(count, 1.0))
        self.lap("update", updating)
        sums[:4] = all_sum(sums[:4], self.env)
        sums /= cfg.num_iterations
        self.step += 1
        return self._stats(rollouts, sums, time.perf_counter() - start), rollouts

    def _stats(self, rollouts: list[Rollout], sums: torch.Tensor, seconds: float) -> StepStats:
        G = self.cfg.num_generations
        rewards = all_gather_cat(torch.cat([r.rewards for r in rollouts]), self.env)  # [global B, K]
        total = weighted_reward_sum(rewards, self.reward_weights)  # [global B], NaN where no function scored
        group_std = nan_std(total.view(-1, G))  # [global B / G]
        lengths = all_gather_cat(torch.cat([r.lengths.float() for r in rollouts]), self.env)
        truncated = all_gather_cat(torch.cat([r.truncated.float() for r in rollouts]), self.env)
        loss, kl, entropy, clip, grad_norm = sums.tolist()
        return StepStats(
            step=self.step,
            reward=total.nanmean().item(),
            reward_std=group_std.mean().item(),
            frac_reward_zero_std=zero_std_groups(total, G).float().mean().item(),
            frac_unscorable=total.isnan().float().mean().item(),
            completion_length=lengths.mean().item(),
            truncated=truncated.mean().item(),
            loss=loss,
            kl=kl if self.cfg.beta > 0 else 0.0,
            entropy=entropy,
            clip_ratio=clip,
            grad_norm=grad_norm,
            lr=self.scheduler.get_last_lr()[0],
            step_time=seconds,
            entropy_coef=self.entropy.coef,
            **{f"time_{phase}": t for phase, t in self.times.items()},
        )

    def _autocast(self):
        return self.precision.autocast(self.env.device.type)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (sampling is keyed on seed and step, so the step is the data position).
        Under FSDP2 a collective (every rank calls it): the full weights and optimizer state land on rank 0."""
        trainable, optimizer = full_state(self.policy.model, self.optimizer, sharded=self.cfg.fsdp)
        return {
            "step": self.step,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "entropy_control": self.entropy.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(
            self.policy.model, self.optimizer, state["trainable"], state["optimizer"], sharded=self.cfg.fsdp
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if "entropy_control" in state:  # checkpoints from before the entropy options have none
            self.entropy.load_state_dict(state["entropy_control"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]


def run(
    cfg: GRPOConfig,
    env: DistEnv,
    policy: Policy,
    ref_model: torch.nn.Module | None,
    judge: Judge,
    train_items: Sequence[dict[str, Any]],
    val_items: Sequence[dict[str, Any]],
    reward_funcs: Sequence[RewardFn] | None = None,
) -> dict[str, dict[str, float]]:
    """Trains `cfg.max_steps` steps (or the rest of them on --resume) with evaluations and checkpoints, writing
    the run folder; returns {"before": eval metrics, "after": eval metrics}."""
    trainer = GRPOTrainer(cfg, policy, train_items, env, judge=judge, reward_funcs=reward_funcs, ref_model=ref_model)
    log = RunLog(cfg, env.is_main)
    val = list(val_items[: cfg.eval_items] if cfg.eval_items else val_items)

    def do_eval() -> dict[str, float]:
        batch, tokens = cfg.eval_batch_size, cfg.max_completion_length
        with trainer.precision.autocast(env.device.type):  # generation follows the run's dtype policy
            return evaluate(policy, val, judge, env, batch_size=batch, max_new_tokens=tokens, synced=cfg.fsdp).metrics

    if env.is_main:  # on --resume: the run's saved config with the new flags on top (grpo_fast.train)
        save_yaml(cfg, cfg.run_dir / "config.yaml")
    if cfg.resume:
        checkpoint = latest_checkpoint(cfg.run_dir)
        trainer.load_state_dict(load_trainer_state(checkpoint))
        log.resume_at(trainer.step)
        before = next((r for r in log.records if r["step"] == 0 and "eval/reward" in r), None) if env.is_main else {}
        if env.is_main:
            print(f"resuming from {checkpoint} (step {trainer.step})")
            if trainer.step >= cfg.max_steps:
                print(f"resume: step {trainer.step} reaches --max-steps {cfg.max_steps}: nothing left to train")
    else:
        before = do_eval()
        log.log({"step": 0, **before, **judge_metrics(judge, env)})
    bar = tqdm(
        range(trainer.step, cfg.max_steps),
        desc="grpo",
        unit="step",
        disable=not env.is_main,
        initial=trainer.step,
        total=cfg.max_steps,
    )
    after = None
    unscorable_streak = 0  # steps in a row with more than max_unscorable_fraction of their completions unscorable
    for _ in bar:
        stats, rollouts = trainer.train_step()
        step = stats.step
        bar.set_postfix(
            reward=f"{stats.reward:.3f}",
            kl=f"{stats.kl:.4f}",
            unscorable=f"{stats.frac_unscorable:.2f}",
            step_s=f"{stats.step_time:.1f}",
            split=stats.time_split(),
        )
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            log.log(stats.record() | judge_metrics(judge, env))
            log.samples(sample_records(rollouts[0], step, cfg.log_samples))
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
            after = do_eval()
            log.log({"step": step, **after, **judge_metrics(judge, env)})
        unscorable_streak = unscorable_streak + 1 if stats.frac_unscorable > cfg.max_unscorable_fraction else 0
        stop = unscorable_streak == cfg.unscorable_patience  # on every rank: the fraction is the global batch's
        if step % cfg.save_steps == 0 or step == cfg.max_steps or stop:
            state = trainer.state_dict()
            if env.is_main:
                # the gathered weights: a sharded model cannot save itself
                save_model = partial(policy.save, state_dict=state["trainable"] if cfg.fsdp else None)
                save_checkpoint(cfg.run_dir, step, state, save_model, cfg)
            barrier(env)
        if stop:
            log.close()
            raise UnscorableError(
                f"{unscorable_streak} steps in a row (up to step {step}) had more than "
                f"{cfg.max_unscorable_fraction:.0%} of their completions unscorable (step {step}: "
                f"{stats.frac_unscorable:.0%}): the judge's replies hold no valid score or verdict, or its requests "
                f"fail (judge/* in {cfg.run_dir / 'metrics.jsonl'}); fix the judge (--judge-*) and continue from the "
                f"checkpoint of step {step} with --resume"
            )
    if after is None:  # resumed at the end: nothing left to train, but this run's judge evaluates it
        after = do_eval()
        log.log({"step": trainer.step, **after, **judge_metrics(judge, env)})
    weights = full_weights(policy.model) if cfg.fsdp else None  # a collective
    if env.is_main:
        policy.save(cfg.run_dir / "final", weights)  # LoRA: PEFT saves the adapter
        log.plot()
        log.close()
        print(format_table(before, after))
    return {"before": before, "after": after}
