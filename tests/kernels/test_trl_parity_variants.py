"""Every loss variant against TRL's own `GRPOTrainer._compute_loss`, run unbound on a stand-in trainer: the loss,
`d loss / d logp`, `d loss / d entropy` and the metrics, on every backend, in fp32 and in bf16 (bf16 judged by the
error rule of `tests.kernels.utils` against TRL in fp64, with TRL in bf16 as the measure)."""

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_fast.kernels import grpo_loss, high_entropy_mask, use_backend
from tests.kernels.utils import BACKENDS, DTYPES, assert_close_to_ref

ALL_BACKENDS = (*BACKENDS, "reference")

# TRL's defaults for what a case leaves out (GRPOConfig 1.16)
TRL_DEFAULTS = {
    "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.28, "delta": None, "use_bias_correction_kl": True,
    "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0, "off_policy_mask_threshold": None, "entropy_coef": 0.0,
    "top_entropy_quantile": 1.0,
}
CASES = {
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},
    "sapo": {"loss_type": "sapo"},
    "sapo-temperatures": {"loss_type": "sapo", "sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5},
    "luspo": {"loss_type": "luspo"},
    "vespo": {"loss_type": "vespo"},
    "vespo-on-policy": {"loss_type": "vespo", "on_policy": True},
    "vespo-params": {"loss_type": "vespo", "vespo_k_pos": 1.0, "vespo_lambda_pos": 0.5, "vespo_k_neg": 4.0,
                     "vespo_lambda_neg": 1.0},
    "off-policy-mask": {"loss_type": "dapo", "off_policy_mask_threshold": 0.01},
    "bias-corrected-kl": {"loss_type": "grpo", "delta": 1.5},
    "bias-corrected-kl-on-policy": {"loss_type": "bnpo", "on_policy": True},
    "entropy-bonus": {"loss_type": "dapo", "entropy_coef": 0.1},
    "top-entropy": {"loss_type": "grpo", "top_entropy_quantile": 0.3},
    "top-entropy-bonus": {"loss_type": "dr_grpo", "top_entropy_quantile": 0.5, "entropy_coef": 0.05},
    "everything": {"loss_type": "cispo", "epsilon_high": 1.2, "top_entropy_quantile": 0.6, "entropy_coef": 0.02,
                   "off_policy_mask_threshold": 0.0},
}
# TRL logs these too; grpo_fast does not
TRL_ONLY_METRICS = {"clip_ratio/low_min", "clip_ratio/high_max", "entropy_coef"}


def _case(seed=3, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0] = False
    mask[0, 0] = True  # TRL's per-sequence clip logging divides by each sequence's length
    return {
        "logp": logp, "old": logp + 0.3 * torch.randn(b, t, generator=g),
        "ref": logp + 0.3 * torch.randn(b, t, generator=g), "adv": torch.randn(b, generator=g), "mask": mask,
        "entropy": torch.rand(b, t, generator=g) * 2,
    }


def _trl(case, options, level, dtype):
    """TRL's `_compute_loss` on `case` in `dtype` -> (loss, metrics, d loss / d logp, d loss / d entropy)."""
    trainer_cls = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    o = {**TRL_DEFAULTS, **options}
    logp = case["logp"].to(dtype).requires_grad_()
    entropy = case["entropy"].to(dtype).requires_grad_()
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, pad_across_processes=lambda x, dim, pad_index: x,
                                  sync_gradients=True)
    args = SimpleNamespace(steps_per_generation=1, entropy_target=0.2, **{
        k: o[k] for k in ("use_bias_correction_kl", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
                          "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")})
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None),
        top_entropy_quantile=o["top_entropy_quantile"], off_policy_mask_threshold=o["off_policy_mask_threshold"],
        importance_sampling_level=level, beta=o["beta"], loss_type=o["loss_type"], epsilon_low=o["epsilon_low"],
        epsilon_high=o["epsilon_high"], use_vllm=False, args=args, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=9, accelerator=accelerator,
        entropy_coef=o["entropy_coef"], use_adaptive_entropy=False, _entropy_bonus_enabled=o["entropy_coef"] != 0,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        get_off_policy_mask=trainer_cls.get_off_policy_mask, get_gamma_weights=trainer_cls.get_gamma_weights,
    )
    trainer.get_high_entropy_mask = functools.partial(trainer_cls.get_high_entropy_mask, trainer)
    b, t = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": case["mask"].long(),
        "advantages": case["adv"].to(dtype), "ref_per_token_logps": case["ref"].to(dtype),
        "old_per_token_logps": None if o.get("on_policy") else case["old"].to(dtype),
        "num_items_in_batch": case["mask"].sum().float(),
    }
    loss = trainer_cls._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, logp.grad, entropy.grad


def _ours(backend, case, options, level, dtype):
    o = {**TRL_DEFAULTS, **options}
    quantile, on_policy = o.pop("top_entropy_quantile"), o.pop("on_policy", False)
    logp = case["logp"].to(dtype).requires_grad_()
    entropy = case["entropy"].to(dtype).requires_grad_()
    entropy_mask = high_entropy_mask(entropy, case["mask"], quantile) if quantile < 1.0 else None
    with use_backend(backend):
        loss, metrics = grpo_loss(
            logp, None if on_policy else case["old"].to(dtype), case["ref"].to(dtype), case["adv"].to(dtype),
            case["mask"], importance_sampling_level=level, max_completion_length=9, entropy=entropy,
            entropy_mask=entropy_mask, **o,
        )
    loss.backward()
    return loss, {k: v.item() for k, v in metrics.items()}, logp.grad, entropy.grad


def _check_keys(metrics, trl_metrics):
    assert set(metrics) == set(trl_metrics) - TRL_ONLY_METRICS


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_with_trl_fp32(backend, name, level):
    case = _case()
    trl_loss, trl_metrics, trl_grad, trl_grad_h = _trl(case, CASES[name], level, torch.float32)
    loss, metrics, grad, grad_h = _ours(backend, case, CASES[name], level, torch.float32)
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(grad, trl_grad)
    assert (grad_h is None) == (trl_grad_h is None)  # no entropy bonus: no gradient to the entropy
    if grad_h is not None:
        torch.testing.assert_close(grad_h, trl_grad_h)
    _check_keys(metrics, trl_metrics)
    for key, value in metrics.items():
        assert value == pytest.approx(trl_metrics[key], abs=1e-6), key


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_parity_with_trl_bf16(backend, name, level):
    # the inputs rounded to bf16 once, so that TRL in fp64 sees the very numbers the bf16 runs see
    case = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in _case().items()}
    atol = dict(DTYPES)[torch.bfloat16]
    trl64 = _trl(case, CASES[name], level, torch.float64)
    trl16 = _trl(case, CASES[name], level, torch.bfloat16)
    ours = _ours(backend, case, CASES[name], level, torch.bfloat16)
    assert ours[2].dtype == torch.bfloat16
    for name_, out, ref16, ref64 in zip(("loss", "d logp", "d entropy"), (ours[0], ours[2], ours[3]),
                                        (trl16[0], trl16[2], trl16[3]), (trl64[0], trl64[2], trl64[3])):
        if ref64 is None:  # no entropy bonus: no gradient to the entropy
            assert out is None
            continue
        assert_close_to_ref(out, ref16, ref64, atol, name_)
    _check_keys(ours[1], trl64[1])
    for key, value in ours[1].items():
        assert_close_to_ref(torch.tensor(value), torch.tensor(trl16[1][key]), torch.tensor(trl64[1][key]), atol, key)
