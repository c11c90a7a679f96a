"""Preference losses against TRL's own implementations, on the same model and batch.

TRL's trainers compute their losses inside methods that read the trainer's attributes; the tests
call those methods unbound on a namespace holding just those attributes, so what is compared is
TRL's code, not a transcription of it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from temper.align.preference import PreferenceLoss, RewardLoss, adapters_off_reference, frozen_reference
from temper.model.config import PRESETS
from temper.model.heads import RewardModel, last_positions
from temper.model.hf.config import to_hf_config
from temper.model.hf.weights import to_hf_state_dict
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.losses import IGNORE_INDEX, Batch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

P, T = 3, 14


def _models():
    torch.manual_seed(0)
    cfg = PRESETS["debug-llama"]
    policy = Transformer(cfg).eval()
    reference = Transformer(cfg).eval()  # another random model: the log-ratios are far from zero
    return cfg, policy, reference


def _hf(model: Transformer):
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(model.cfg))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    hf.load_state_dict(to_hf_state_dict(model.cfg, model.state_dict()), strict=False)
    return hf


def _pairs(vocab: int):
    """Right-padded rows of prompts + responses of different lengths: TRL's input_ids, attention_mask and
    completion_mask, and temper's Batch of the same tokens (targets only on the responses)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(2 * P, T, dtype=torch.long)
    attn = torch.zeros(2 * P, T, dtype=torch.long)
    comp = torch.zeros(2 * P, T, dtype=torch.long)
    for r in range(2 * P):
        prompt, resp = 3 + r % 3, 2 + (5 * r) % 7
        ids[r, :prompt + resp] = torch.randint(1, vocab, (prompt + resp,), generator=g)
        attn[r, :prompt + resp] = 1
        comp[r, prompt:prompt + resp] = 1
    targets = torch.where(comp[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return ids, attn, comp, Batch(ids[:, :-1], targets)


def _trl_dpo(loss_type: str, beta: float, hf_policy, ref_logps, ids, attn, comp, label_smoothing: float = 0.0):
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(hf_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    ns = SimpleNamespace(model=hf_policy, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                         precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                         loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                         args=SimpleNamespace(discopop_tau=0.05),
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                         _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
              "ref_chosen_logps": ref_logps[:P], "ref_rejected_logps": ref_logps[P:]}
    loss = DPOTrainer._compute_loss(ns, hf_policy, inputs, False)
    return loss, {k: v[-1] for k, v in ns._metrics["eval"].items()}


TRL_SMOOTHING = {"robust": 0.2, "exo_pair": 1e-3}
"""label_smoothing of the kinds that read it in TRL's DPOTrainer (its sigmoid does not: cDPO is tested below)."""


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                                  "apo_zero", "apo_down", "discopop", "sigmoid_norm"])
def test_dpo_family_equals_trl_dpo_trainer(kind):
    cfg, policy, reference = _models()
    ids, attn, comp, batch = _pairs(cfg.vocab_size)
    smoothing = TRL_SMOOTHING.get(kind, 0.0)
    loss_fn = PreferenceLoss(kind, beta=0.3, label_smoothing=smoothing, reference=frozen_reference(reference))
    ref_logps = loss_fn.reference_logps(batch)
    out = loss_fn(policy, batch)
    ours = out.loss_sum / loss_fn.count(batch)
    theirs, metrics = _trl_dpo(kind, 0.3, _hf(policy), ref_logps, ids, attn, comp, smoothing)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert out.metrics[name].item() / P == pytest.approx(metrics[name], rel=1e-5, abs=1e-5), name


def _cpo_namespace(loss_type: str, beta: float, label_smoothing: float, gamma: float):
    return SimpleNamespace(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                           cpo_alpha=0.0, alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))


def _avg_logps(policy, batch):
    from temper.align.preference import response_logprobs

    with torch.no_grad():
        logps, n = response_logprobs(policy, batch)
    return logps / n


def test_simpo_equals_trl_cpo_trainer():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    cfg, policy, _ = _models()
    *_, batch = _pairs(cfg.vocab_size)
    loss_fn = PreferenceLoss("simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)
    out = loss_fn(policy, batch)
    avg = _avg_logps(policy, batch)
    losses, rc, rr = CPOTrainer.cpo_loss(_cpo_namespace("simpo", 2.0, 0.1, 0.7), avg[:P], avg[P:])
    torch.testing.assert_close(out.loss_sum / P, losses.mean(), rtol=1e-5, atol=1e-6)
    assert out.metrics["rewards/chosen"].item() / P == pytest.approx(rc.mean().item(), rel=1e-5)
    assert out.metrics["rewards/margins"].item() / P == pytest.approx((rc - rr).mean().item(), rel=1e-5)


def test_conservative_dpo_is_the_label_smoothed_sigmoid_of_trl():
    """cDPO's loss on the log-ratios is CPO's label-smoothed sigmoid loss on them (the same formula)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    cfg, policy, reference = _models()
    *_, batch = _pairs(cfg.vocab_size)
    loss_fn = PreferenceLoss("sigmoid", beta=0.5, label_smoothing=0.2, reference=frozen_reference(reference))
    out = loss_fn(policy, batch)
    from temper.align.preference import response_logprobs

    with torch.no_grad():
        ratio = response_logprobs(policy, batch)[0] - loss_fn.reference_logps(batch)
    losses, *_ = CPOTrainer.cpo_loss(_cpo_namespace("sigmoid", 0.5, 0.2, 0.0), ratio[:P], ratio[P:])
    torch.testing.assert_close(out.loss_sum / P, losses.mean(), rtol=1e-5, atol=1e-6)


def test_orpo_equals_trl_orpo_trainer_on_equal_lengths():
    """ORPO's SFT term is per-pair mean NLL (the paper's); TRL averages over the batch's tokens, so the
    two agree when the chosen responses have equal lengths, as here."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    cfg, policy, _ = _models()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, cfg.vocab_size, (2 * P, T), generator=g)
    targets = ids[:, 1:].clone()
    targets[:, :4] = IGNORE_INDEX  # a 5-token prompt, the same 9-token response length everywhere
    batch = Batch(ids[:, :-1], targets)
    loss_fn = PreferenceLoss("orpo", beta=0.25)
    out = loss_fn(policy, batch)
    avg = _avg_logps(policy, batch)
    ns = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, rc, rr, ratio, log_odds = ORPOTrainer.odds_ratio_loss(ns, avg[:P], avg[P:])
    nll = -avg[:P].mean()
    torch.testing.assert_close(out.loss_sum / P, nll - losses.mean(), rtol=1e-5, atol=1e-6)
    assert out.metrics["log_odds_ratio"].item() / P == pytest.approx(ratio.item(), rel=1e-5)
    assert out.metrics["log_odds_chosen"].item() / P == pytest.approx(log_odds.item(), rel=1e-5)


def test_reward_loss_equals_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    cfg, policy, _ = _models()
    ids, attn, comp, batch = _pairs(cfg.vocab_size)
    torch.manual_seed(3)
    model = RewardModel(policy)
    last = last_positions(attn.bool())
    margin = torch.tensor([0.0, 0.5, 1.0])
    rbatch = Batch(ids, ids, extra={"last": last, "margin": margin})
    loss_fn = RewardLoss(center_coef=0.01)
    out = loss_fn(model, rbatch)

    scores = model(ids, last=last).detach()
    trainer_model = SimpleNamespace(training=True)

    def hf_like(**inputs):  # the sequence-classification output TRL reads: logits (2P, 1)
        return SimpleNamespace(logits=scores[:, None])

    ns = SimpleNamespace(model=trainer_model, args=SimpleNamespace(center_rewards_coefficient=0.01),
                         accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
                         _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    theirs = RewardTrainer.compute_loss(ns, hf_like, {"input_ids": ids, "attention_mask": attn, "margin": margin})
    torch.testing.assert_close(out.loss_sum / P, theirs, rtol=1e-5, atol=1e-6)
    assert out.metrics["accuracy"].item() / P == pytest.approx(ns._metrics["train"]["accuracy"][-1])
    assert out.metrics["margin"].item() / P == pytest.approx(ns._metrics["train"]["margin"][-1], rel=1e-5)


def test_lora_reference_is_the_base_without_a_second_copy():
    """Adapters off gives the base model's log-probs exactly, and the policy's differ once B is nonzero."""
    cfg, policy, _ = _models()
    *_, batch = _pairs(cfg.vocab_size)
    base = copy.deepcopy(policy)
    apply_lora(policy, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    ref = adapters_off_reference(policy)(batch)
    torch.testing.assert_close(ref, frozen_reference(base)(batch), rtol=0, atol=1e-5)
    loss_fn = PreferenceLoss("sigmoid", reference=adapters_off_reference(policy))
    out = loss_fn(policy, batch)
    assert out.metrics["rewards/margins"].abs().item() > 0
    out.loss_sum.backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)


def test_bad_batches_are_refused():
    cfg, policy, _ = _models()
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        PreferenceLoss("exo_pair")
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'"):
        PreferenceLoss("dpo")
    with pytest.raises(ValueError, match=r"\(2P rows\), got 3 rows"):
        PreferenceLoss("simpo")(policy, Batch(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        PreferenceLoss("sigmoid")(policy, _pairs(cfg.vocab_size)[-1])


def test_kto_equals_trl_kto_trainer():
    """KTO's loss and metrics against TRL's KTOTrainer on the same examples and mismatched KL rows."""
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from temper.align.preference import KTOLoss

    cfg, policy, reference = _models()
    ids, attn, comp, batch = _pairs(cfg.vocab_size)  # 2P rows: here 2P unpaired examples
    n = 2 * P
    kl_ids, kl_attn, kl_comp, kl_batch = _pairs(cfg.vocab_size)
    g = torch.Generator().manual_seed(7)
    kl_ids = torch.where(kl_comp.bool(), torch.randint(1, cfg.vocab_size, kl_ids.shape, generator=g), kl_ids)
    kl_batch = Batch(kl_ids[:, :-1], torch.where(kl_comp[:, 1:].bool(), kl_ids[:, 1:], IGNORE_INDEX))
    label = torch.tensor([True, False, True, True, False, False])
    both = Batch(torch.cat([batch.inputs, kl_batch.inputs]), torch.cat([batch.targets, kl_batch.targets]),
                 extra={"label": label})
    loss_fn = KTOLoss(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5, reference=frozen_reference(reference))
    ref = frozen_reference(reference)(both)
    out = loss_fn(policy, both)

    hf = _hf(policy)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits"))
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    ns = SimpleNamespace(model=hf, accelerator=acc, calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
                         beta=0.3, desirable_weight=1.0, undesirable_weight=1.5, aux_loss_enabled=False,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                         _tp_size=1)
    ns._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(ns, m, b)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "KL_input_ids": kl_ids,
              "KL_attention_mask": kl_attn, "KL_completion_mask": kl_comp, "label": label,
              "ref_logps": ref[:n], "ref_KL_logps": ref[n:]}
    with torch.no_grad():
        theirs = KTOTrainer._compute_loss(ns, hf, inputs, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(out.loss_sum / n, theirs.float(), rtol=1e-5, atol=1e-6)
    metrics = ns._metrics["eval"]
    assert out.metrics["kl"].item() / n == pytest.approx(metrics["kl"][-1], rel=1e-5, abs=1e-6)
    n_good = int(label.sum())
    assert out.metrics["rewards/desirable"].item() / n_good == pytest.approx(metrics["rewards/chosen"][-1],
                                                                             rel=1e-5, abs=1e-5)
    assert out.metrics["rewards/undesirable"].item() / (n - n_good) == pytest.approx(metrics["rewards/rejected"][-1],
                                                                                     rel=1e-5, abs=1e-5)


def test_kto_on_unpaired_examples_equals_trl_with_unequal_labels():
    """Unpaired data, 5 desirable and 1 undesirable: `collate_kto`'s rows and KL rows against TRL's own KL
    completions (its rotation by one within the batch) and collator, and KTO's loss and metrics against TRL's."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from temper.align.preference import KTOLoss
    from temper.data.prefs import UnpairedExample, collate_kto

    cfg, policy, reference = _models()
    g = torch.Generator().manual_seed(5)
    labels = [True, True, False, True, True, True]
    examples = []
    for k, label in enumerate(labels):
        prompt = torch.randint(1, cfg.vocab_size, (2 + k % 3,), generator=g).int().numpy()
        completion = torch.randint(1, cfg.vocab_size, (1 + (3 * k) % 5,), generator=g).int().numpy()
        examples.append(UnpairedExample(prompt, completion, completion > -1, label, f"u:{k}"))
    b, label = collate_kto(examples)
    batch = Batch(b.inputs, b.targets, extra={"label": label})
    n = len(examples)
    loss_fn = KTOLoss(beta=0.2, desirable_weight=1.0, undesirable_weight=2.0)
    ref = frozen_reference(reference)(batch)
    batch.extra["ref_logps"] = ref
    out = loss_fn(policy, batch)

    rows = [{"prompt_ids": e.prompt.tolist(), "completion_ids": e.completion.tolist(), "label": e.label}
            for e in examples]
    completions = [r["completion_ids"] for r in rows]
    for r, kl in zip(rows, [completions[-1]] + completions[:-1]):  # TRL's add_kl_completion_ids
        r["KL_completion_ids"] = kl
    inputs = DataCollatorForUnpairedPreference(pad_token_id=0)(rows)
    for prefix, key in (("", "ref_logps"), ("KL_", "ref_KL_logps")):  # the reference on TRL's own rows
        ids, comp = inputs[f"{prefix}input_ids"], inputs[f"{prefix}completion_mask"]
        rows_batch = Batch(ids[:, :-1], torch.where(comp[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX))
        inputs[key] = frozen_reference(reference)(rows_batch)
    hf = _hf(policy)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits"))
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    ns = SimpleNamespace(model=hf, accelerator=acc, calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
                         beta=0.2, desirable_weight=1.0, undesirable_weight=2.0, aux_loss_enabled=False,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                         _tp_size=1)
    ns._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(ns, m, b)
    with torch.no_grad():
        theirs = KTOTrainer._compute_loss(ns, hf, inputs, False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(out.loss_sum / loss_fn.count(batch), theirs.float(), rtol=1e-5, atol=1e-6)
    metrics = ns._metrics["eval"]
    assert out.metrics["kl"].item() / n == pytest.approx(metrics["kl"][-1], rel=1e-5, abs=1e-6)
    assert metrics["kl"][-1] > 0  # not clamped: the KL rows' pairing shows in the loss
    assert out.metrics["rewards/desirable"].item() / 5 == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-5,
                                                                        abs=1e-5)
    assert out.metrics["rewards/undesirable"].item() == pytest.approx(metrics["rewards/rejected"][-1], rel=1e-5,
                                                                      abs=1e-5)


def _pref_examples(vocab: int, n: int = 3) -> list:
    """Pairs with prompts and responses of different lengths (one prompt of a single token), loss masks
    that leave a response's last token unlearnt (template layout after the end of turn)."""
    import numpy as np

    from temper.data.prefs import PrefExample

    g = np.random.default_rng(3)
    out = []
    for k in range(n):
        prompt, c, r = (g.integers(1, vocab, size).astype(np.int32) for size in (1 + 4 * k, 2 + k, 5 - k))
        mask_c, mask_r = np.ones(len(c), bool), np.ones(len(r), bool)
        mask_c[-1] = k % 2 == 0
        out.append(PrefExample(prompt, c, r, mask_c, mask_r, f"t:{k}"))
    return out


def _loss_and_grads(loss_fn, model, batch):
    model.zero_grad()
    out = loss_fn(model, batch)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo", "orpo", "kto"])
def test_shared_prompt_batches_equal_padded_ones(kind):
    """One row per pair (the prompt once, both responses behind it, `collate_pairs_shared` /
    `collate_unpaired_shared`) gives the padded batch's losses, metrics and gradients: the same
    sequences in the same order, each response seeing only its prompt and itself."""
    from temper.align.preference import KTOLoss, as_batch
    from temper.data.prefs import (
        collate_pairs,
        collate_pairs_shared,
        collate_unpaired,
        collate_unpaired_shared,
    )

    cfg, policy, reference = _models()
    examples = _pref_examples(cfg.vocab_size)
    ref = frozen_reference(reference)
    if kind == "kto":
        loss_fn, padded, shared = KTOLoss(beta=0.3, undesirable_weight=1.5, reference=ref), collate_unpaired, \
            collate_unpaired_shared
        extra = {"label": torch.arange(2 * len(examples)) < len(examples)}
    else:
        loss_fn, padded, shared, extra = PreferenceLoss(kind, beta=0.2, reference=ref), collate_pairs, \
            collate_pairs_shared, {}
    a, b = padded(examples, pad_id=0), shared(examples, pad_id=0)
    assert b.inputs.shape[0] == a.inputs.shape[0] // 2 and b.inputs.numel() < a.inputs.numel()
    assert torch.equal(b.response_tokens, a.response_tokens) and torch.equal(b.lengths, a.lengths)
    out_a, grads_a = _loss_and_grads(loss_fn, policy, as_batch(a, "cpu", extra))
    out_b, grads_b = _loss_and_grads(loss_fn, policy, as_batch(b, "cpu", extra))
    assert loss_fn.count(as_batch(b, "cpu", extra)) == loss_fn.count(as_batch(a, "cpu", extra))
    torch.testing.assert_close(out_b.loss_sum, out_a.loss_sum, rtol=1e-5, atol=1e-5)
    for name, value in out_a.metrics.items():
        torch.testing.assert_close(out_b.metrics[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(ref(as_batch(b, "cpu")), ref(as_batch(a, "cpu")), rtol=1e-5, atol=1e-5)


def test_shared_prompt_rows_hold_each_response_after_its_prompt():
    """The layout: prompt minus its last token (segment 0), then last prompt token + chosen (1) and last
    prompt token + rejected (2), positions continuing the prompt's in each branch, targets only where a
    learnt response token is predicted, each mapped to its sequence in `collate_pairs`' order."""
    from temper.data.prefs import collate_pairs_shared

    e = _pref_examples(100, n=2)[1]  # prompt 5, chosen 3 (the last not learnt), rejected 4
    b = collate_pairs_shared([e, e])
    row = b.inputs[0, :4 + 4 + 5].tolist()
    assert row == e.prompt[:4].tolist() + e.prompt[4:].tolist() + e.chosen.tolist() + e.prompt[4:].tolist() + \
        e.rejected.tolist()
    assert b.segment_ids[0, :13].tolist() == [0] * 4 + [1] * 4 + [2] * 5
    assert b.positions[0, :13].tolist() == [0, 1, 2, 3] + [4, 5, 6, 7] + [4, 5, 6, 7, 8]
    assert b.targets[0, :13].tolist() == [IGNORE_INDEX] * 4 + e.chosen[:2].tolist() + [IGNORE_INDEX] * 2 + \
        e.rejected.tolist() + [IGNORE_INDEX]
    assert b.seq[1, :13].tolist() == [-1] * 4 + [1] * 2 + [-1] * 2 + [3] * 4 + [-1]  # pair 1: chosen 1, rejected 3
    assert b.response_tokens.tolist() == [2, 2, 4, 4] and b.lengths.tolist() == [8, 8, 9, 9]
