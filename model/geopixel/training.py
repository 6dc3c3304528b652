"""GeoPixel's training forward and losses (ARCHITECTURE.md §5.2, §9.1).

Layout per sample (§5.2, golden README quirk 1): ``image embeddings + [BOS] + conversation + </s>``,
right-padded across the batch (pad = embedding of id 0, label −100, im_mask 0). The LLM runs with
a plain causal mask: with right padding every real token sees exactly the tokens it would see
unpadded. CE is the standard shifted cross-entropy over float32 logits, mean over supervised
tokens; logits are computed only at the supervised positions (the same value as the reference's
full-vocabulary logits at every position, without the (T, vocab) tensor). The ``[SEG]``
positions are those whose *label* is ``[SEG]`` (the position where it is the input token); their
final-normed hidden states go through ``text_hidden_fcs`` to the SAM-2 mask decoder in train mode
(mask token 0), masks are upsampled to the image size and scored with BCE + Dice exactly as the
reference (quirk 14): per-mask means, each sample's sum divided by its mask count and multiplied
back, the batch sum divided by the total count, Dice on inputs/targets scaled by 1/1000 with eps
1e-6; total = 1.0·CE + 2.0·BCE + 0.5·Dice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geopixel.grounding import ImageFeatures

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    """Loss weights of the reference ``train.py`` (``ce_loss_weight`` etc.)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


@dataclass
class TrainBatch:
    """A collated training batch of B samples.

    Attributes:
        input_ids: (B, T) ids, ``-1`` at image positions, pad id after the sequence end.
        labels: (B, T) targets (unshifted), −100 where ignored.
        im_mask: (B, T) bool, true on image positions (the first ``L_b`` of row b).
        crops: (sum_b (1 + h_b·w_b), 3, 560, 560) CLIP crops, samples back to back.
        grids: (h, w) tile grid per sample.
        sam_pixels: (B, 3, 1024, 1024) SAM-2 inputs (None when ``sam_features`` is given).
        gt_masks: Per sample, (n_b, H_b, W_b) ground-truth masks in ``[SEG]`` order.
        sam_features: Optional precomputed SAM-2 features of the batch (the encoder is frozen).
    """

    input_ids: Tensor
    labels: Tensor
    im_mask: Tensor
    crops: Tensor
    grids: list[tuple[int, int]]
    sam_pixels: Tensor | None
    gt_masks: list[Tensor]
    sam_features: ImageFeatures | None = None

    def to(self, device: torch.device) -> TrainBatch:
        """Move every tensor to ``device``."""
        feats = self.sam_features
        if feats is not None:
            feats = ImageFeatures(feats.image_embed.to(device), tuple(h.to(device) for h in feats.high_res))  # type: ignore[arg-type]
        return TrainBatch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            im_mask=self.im_mask.to(device),
            crops=self.crops.to(device),
            grids=self.grids,
            sam_pixels=None if self.sam_pixels is None else self.sam_pixels.to(device),
            gt_masks=[m.to(device) for m in self.gt_masks],
            sam_features=feats,
        )


@dataclass
class TrainOutput:
    """Losses and intermediates of one training forward.

    Attributes:
        loss: Weighted total (what is back-propagated).
        ce: Unweighted CE.
        bce: Weighted BCE (as the reference logs it).
        dice: Weighted Dice.
        bce_unweighted: BCE before its weight.
        dice_unweighted: Dice before its weight.
        n_label_tokens: Supervised tokens.
        seg_embeddings: (N, out_dim) projected ``[SEG]`` prompts of the whole batch.
        low_res_masks: (N, 1, 256, 256) decoder outputs.
        mask_logits: Per sample, (n_b, H_b, W_b) mask logits at the image size.
    """

    loss: Tensor
    ce: Tensor
    bce: Tensor
    dice: Tensor
    bce_unweighted: Tensor
    dice_unweighted: Tensor
    n_label_tokens: int
    seg_embeddings: Tensor
    low_res_masks: Tensor
    mask_logits: list[Tensor] = field(default_factory=list)


def shifted_ce(hidden: Tensor, labels: Tensor, head: nn.Module) -> tuple[Tensor, int]:
    """Next-token CE: logits at t predict label t+1; float32 logits; mean over supervised tokens.

    Args:
        hidden: (B, T, C) final-normed hidden states.
        labels: (B, T) unshifted labels, −100 = ignored.
        head: The ``output`` projection (C → vocab).

    Returns:
        The loss and the number of supervised tokens.
    """
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    logits = head(hidden[:, :-1][keep]).float()  # (N, vocab)
    return F.cross_entropy(logits, target[keep]), n


def sigmoid_bce_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-mask mean binary cross-entropy with logits: (n, H, W) → (n,)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(1)


def dice_per_mask(logits: Tensor, targets: Tensor, *, scale: float = 1000.0, eps: float = 1e-6) -> Tensor:
    """Reference Dice loss per mask: ``1 − (2Σ(p/s)·t + eps) / (Σp/s + Σt/s + eps)``, (n, H, W) → (n,)."""
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    numerator = 2 * (p / scale * t).sum(-1)
    denominator = (p / scale).sum(-1) + (t / scale).sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_losses(preds: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """BCE and Dice over a batch with the reference's normalisation (unweighted).

    Args:
        preds: Per sample, (n_b, H, W) mask logits.
        targets: Per sample, (n_b, H, W) {0, 1} masks.

    Returns:
        (bce, dice); zeros attached to the graph when the batch has no masks.
    """
    bce_sum = dice_sum = None
    total = 0
    for pred, gt in zip(preds, targets, strict=True):
        n = gt.shape[0]
        if n == 0:
            continue
        bce_b = sigmoid_bce_per_mask(pred, gt).sum() / (n + 1e-8) * n
        dice_b = dice_per_mask(pred, gt).sum() / (n + 1e-8) * n
        bce_sum = bce_b if bce_sum is None else bce_sum + bce_b
        dice_sum = dice_b if dice_sum is None else dice_sum + dice_b
        total += n
    if bce_sum is None or dice_sum is None:
        zero = sum((p.sum() for p in preds), torch.zeros(())) * 0.0
        return zero, zero
    return bce_sum / (total + 1e-8), dice_sum / (total + 1e-8)


def build_inputs_embeds(model: nn.Module, batch: TrainBatch) -> Tensor:
    """Token embeddings with each sample's image embeddings in its leading image positions.

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel`.
        batch: The batch.

    Returns:
        (B, T, C) input embeddings.
    """
    llm = model.llm
    text = llm.tok_embeddings(batch.input_ids.clamp(min=0))  # (B, T, C)
    device = text.device
    images = model.vision(batch.crops.to(device), batch.grids)  # list of (L_b, C)
    rows = []
    for b, img in enumerate(images):
        n_img = img.shape[0]
        if int(batch.im_mask[b, :n_img].sum()) != n_img or bool(batch.im_mask[b, n_img:].any()):
            raise ValueError(f"sample {b}: im_mask does not mark exactly the first {n_img} positions")
        rows.append(torch.cat([img.to(text.dtype), text[b, n_img:]], dim=0))
    return torch.stack(rows)  # (B, T, C)


def seg_prompts(model: nn.Module, hidden: Tensor, labels: Tensor) -> list[Tensor]:
    """Projected ``[SEG]`` embeddings per sample (positions whose label is ``[SEG]``)."""
    seg = labels == model.config.seg_token_id  # (B, T)
    return [model.grounding.project_seg(hidden[b][seg[b]]) for b in range(hidden.shape[0])]


def predict_masks(
    model: nn.Module, batch: TrainBatch, prompts: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """SAM-2 masks for each sample's prompts (decoder in the module's mode; token 0 in train mode).

    Returns:
        Per sample: full-size logits (n_b, H_b, W_b) and low-res logits (n_b, 1, 256, 256).
    """
    grounding = model.grounding
    features = batch.sam_features
    if features is None:
        if batch.sam_pixels is None:
            raise ValueError("the batch has neither sam_pixels nor sam_features")
        features = grounding.encode_images(batch.sam_pixels.to(prompts[0].device))
    logits, low = [], []
    for b, prompt in enumerate(prompts):
        gt = batch.gt_masks[b]
        if prompt.shape[0] != gt.shape[0]:
            raise ValueError(f"sample {b}: {prompt.shape[0]} supervised [SEG] tokens but {gt.shape[0]} masks")
        if prompt.shape[0] == 0:
            logits.append(gt.new_zeros((0, *gt.shape[1:]), dtype=torch.float32))
            low.append(prompt.new_zeros((0, 1, 1, 1)))
            continue
        out = grounding.decode_masks(
            features, prompt, orig_hw=tuple(gt.shape[1:]), index=b, multimask_stability=False
        )
        logits.append(out.mask_logits)
        low.append(out.low_res)
    return logits, low


def training_forward(
    model: nn.Module, batch: TrainBatch, *, weights: LossWeights = LossWeights()
) -> TrainOutput:
    """One training forward: CE on the text, BCE + Dice on the ``[SEG]`` masks.

    Args:
        model: A :class:`~geopixel.modeling.GeoPixel` (put it in ``train()`` mode yourself).
        batch: A collated batch (see ``geopixel_cli.train.collate``).
        weights: Loss weights (reference defaults).

    Returns:
        Losses and intermediates.
    """
    embeds = build_inputs_embeds(model, batch)
    im_mask = batch.im_mask.to(embeds.device)
    labels = batch.labels.to(embeds.device)
    hidden = model.llm(embeds, im_mask=im_mask)  # (B, T, C) final-normed
    ce, n_tok = shifted_ce(hidden, labels, model.llm.output)
    prompts = seg_prompts(model, hidden, labels)
    logits, low = predict_masks(model, batch, prompts)
    bce, dice = mask_losses(logits, [m.to(embeds.device) for m in batch.gt_masks])
    total = weights.ce * ce + weights.bce * bce + weights.dice * dice
    low_cat = [x for x in low if x.shape[0]]
    return TrainOutput(
        loss=total,
        ce=ce,
        bce=weights.bce * bce,
        dice=weights.dice * dice,
        bce_unweighted=bce,
        dice_unweighted=dice,
        n_label_tokens=n_tok,
        seg_embeddings=torch.cat(prompts) if prompts else hidden.new_zeros((0,)),
        low_res_masks=torch.cat(low_cat) if low_cat else hidden.new_zeros((0, 1, 1, 1)),
        mask_logits=logits,
    )
