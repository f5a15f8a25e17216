"""Train a world model from scratch: ``python -m hf_tokenprune.world.train --family qwen2_vl --out DIR``.

The recipe (a plain next-token run does not learn this task in the time a CPU has: the loss stays at
ln(6), chance):

* an **auxiliary per-visual-token loss**: a linear head on the visual tokens entering the LLM predicts the
  shape and colour of the object the token sees (or "nothing"); it trains the vision tower first;
* **several questions per scene** in one step (``--images`` scenes x ``--questions`` questions);
* an **object-count curriculum** over the first half of the steps (8-16 objects -> 96-144 on 16x16 cells);
* AdamW with linear warm-up and cosine decay.
* optional, for later phases: ``--key-attention`` (:func:`key_attention_loss`, layer 0 looks up what the
  question's key word names) and ``--token-dropout`` (:func:`dropped_tokens`, irrelevant visual tokens removed as
  pruning removes them); why, and the shipped models' four phases: docs/world.md.

Qwen2-VL also sees videos (every ``--video-every``-th step) and a few grid sizes (dynamic resolution).
Batches depend only on ``(seed, step)``, so a run resumed from its checkpoint (``--resume``, saved every
``--checkpoint-every`` steps) sees the same data as an uninterrupted one. The result is an ordinary
``save_pretrained`` directory (safetensors weights, processor, generation config) plus ``training_log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..adapters.regions import TokenRegions
from ..compat import with_cache
from ..features import query_logits
from . import models
from .evaluate import answer_accuracy, chat_prompts
from .evidence import normalised_boxes
from .scenes import BACKGROUND, CELL, COLOURS, KINDS, MIN_OBJECTS, SHAPES, Sample, Scene, make_samples

CURRICULUM = ((0.0, (8, 16)), (0.1, (16, 32)), (0.2, (32, 56)), (0.3, (56, 88)), (0.4, (80, 120)),
              (0.5, (96, 144)))  # objects on a 16x16 grid, scaled to the grid's area
FOREGROUND_DIFFERENCE = 30  # summed |RGB - background| above which a pixel shows an object
STEP_STRIDE = 64  # scene indices per step: steps never share scenes (video steps use 2 x --images)
QWEN_GRIDS = ((16, 16), (16, 16), (16, 16), (12, 16), (16, 12), (14, 14))


def object_range(progress: float) -> tuple[int, int]:
    return [r for start, r in CURRICULUM if progress >= start][-1]


MIN_PIXELS = 6  # object pixels a visual token must show to be labelled with the object


def _token_grid(scene: Scene, image, frame: int, pixels: int) -> torch.Tensor:
    """``[H, W, 2]`` (shape + 1, colour + 1; 0 = nothing) for a grid of ``pixels``-wide visual tokens (at most a
    cell wide) over the rendered frame: a token is labelled with the object of its cell when it shows at least
    :data:`MIN_PIXELS` of its pixels (objects never leave their cell; tokens never straddle cells)."""
    image = torch.from_numpy(np.asarray(image, dtype=np.int64))
    foreground = (image - torch.tensor(BACKGROUND)).abs().sum(-1) > FOREGROUND_DIFFERENCE
    height, width = scene.rows * CELL // pixels, scene.cols * CELL // pixels
    counts = foreground.view(height, pixels, width, pixels).sum(dim=(1, 3))
    labels = torch.zeros(height, width, 2, dtype=torch.long)
    per_cell = CELL // pixels
    for o in scene.objects:
        if o.frame == frame:
            rows = slice(o.row * per_cell, (o.row + 1) * per_cell)
            cols = slice(o.col * per_cell, (o.col + 1) * per_cell)
            labels[rows, cols] = torch.tensor([SHAPES.index(o.shape) + 1, list(COLOURS).index(o.colour) + 1])
    return labels.masked_fill((counts < MIN_PIXELS)[..., None], 0)


def _cell_labels(sample: Sample, family: str) -> torch.Tensor:
    """``[n_visual_features, 2]`` aux-loss labels for the visual features of ``sample``, in the order the vision
    tower emits them (Qwen: merged 8x8-pixel tokens per frame; LLaVA-OV: the 64-pixel thumbnail, whose tokens
    each see 2x2 cells and are left out of the loss (label -100), then the 2x2 high-resolution tiles of
    8x8-pixel tokens, row-major)."""
    scene = sample.scene
    frames = sample.media[::scene.repeat] if sample.is_video else [sample.media]  # the rendered distinct frames
    if family == "qwen2_vl":
        return torch.cat([_token_grid(scene, image, f, 8).reshape(-1, 2) for f, image in enumerate(frames)])
    tokens = _token_grid(scene, frames[0], 0, 8)
    thumbnail = (models.LLAVA_TILE // models.LLAVA_PATCH) ** 2
    parts = [torch.full((thumbnail, 2), -100, dtype=torch.long)]
    parts += [tokens[8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(-1, 2) for r in (0, 1) for c in (0, 1)]
    return torch.cat(parts)


class Batches(torch.utils.data.Dataset):
    """Training batch ``step``: scenes and questions drawn from ``(seed, step)`` alone."""

    def __init__(self, family: str, steps: int, seed: int, images: int, questions: int, video_every: int,
                 kinds: tuple[str, ...] = KINDS, curriculum: bool = True) -> None:
        self.family, self.steps, self.seed = family, steps, seed
        self.images, self.questions, self.video_every = images, questions, video_every
        self.kinds, self.curriculum = kinds, curriculum
        self.processor = models.build_processor(family)
        if 2 * images > STEP_STRIDE:
            raise ValueError(f"at most {STEP_STRIDE // 2} scenes per step, got {images}")

    def __len__(self) -> int:
        return self.steps

    def object_counts(self, step: int) -> tuple[int, int]:
        """Objects per 16x16 scene at ``step``."""
        return object_range(step / self.steps if self.curriculum else 1.0)

    def samples(self, step: int) -> list[Sample]:
        rng = random.Random(f"{self.seed}/{step}")
        video = self.family == "qwen2_vl" and self.video_every > 0 and step % self.video_every == self.video_every - 1
        low, high = self.object_counts(step)
        out = []
        for i in range(self.images * (2 if video else 1)):
            index = step * STEP_STRIDE + i
            if video:
                out += make_samples("train", index, seed=self.seed, video=True, per_scene=self.questions // 2,
                                    kinds=self.kinds)
                continue
            grid = rng.choice(QWEN_GRIDS) if self.family == "qwen2_vl" else (16, 16)
            scale = grid[0] * grid[1] / 256
            n = (max(MIN_OBJECTS, round(low * scale)), max(MIN_OBJECTS, round(high * scale)))
            out += make_samples("train", index, seed=self.seed, per_scene=self.questions, n_objects=n, grid=grid,
                                kinds=self.kinds)
        return out

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return pack_scenes(self.processor, self.samples(step), self.family)


def pack_scenes(processor, samples: list[Sample], family: str | None) -> dict[str, torch.Tensor]:
    """One row per scene: the shared prompt prefix (up to and including the visual tokens) once, then each
    question + answer block. ``blocks[b, i]`` numbers the block of token ``i`` (0 = prefix, -1 = padding);
    :func:`block_attention` and :func:`block_positions` make each block see only the prefix and itself, at the
    positions it would have alone — the same logits as one sequence per question, for a fraction of the cost.
    ``family``: a world model's family, whose aux-loss ``cell_labels`` the batch gets (None: no ``cell_labels``)."""
    tokenizer = processor.tokenizer
    scenes: dict[int, list[Sample]] = {}
    for sample in samples:
        scenes.setdefault(id(sample.scene), []).append(sample)
    texts, block_lengths, key_offsets = [], [], []
    for group in scenes.values():
        prompts = [p + s.question.answer + tokenizer.eos_token
                   for p, s in zip(chat_prompts(processor, group), group, strict=True)]
        cut = prompts[0].index(group[0].question.text)
        suffixes = [p[cut:] for p in prompts]
        if any(p[:cut] != prompts[0][:cut] for p in prompts):
            raise ValueError("the chat template puts question-dependent text before the question")
        texts.append(prompts[0][:cut] + "".join(suffixes))
        ids = [tokenizer(x, add_special_tokens=False)["input_ids"] for x in suffixes]
        block_lengths.append([len(x) for x in ids])
        key_offsets.append([_key_offset(tokenizer, s.question.key, x) for s, x in zip(group, ids, strict=True)])
    firsts = [group[0] for group in scenes.values()]
    media = {"videos" if firsts[0].is_video else "images": [s.media for s in firsts]}
    tokenizer.padding_side = "right"
    batch = dict(processor(text=texts, padding=True, return_tensors="pt", **media))
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    blocks = torch.full_like(batch["input_ids"], -1)
    most = max(len(x) for x in block_lengths)
    key_positions = torch.full((len(texts), most), -1, dtype=torch.long)
    boxes = max(len(s.question.boxes) for group in scenes.values() for s in group)  # key_boxes: a subset
    key_boxes = torch.full((len(texts), most, boxes, 5), torch.nan, dtype=torch.float64)
    evidence_boxes = torch.full((len(texts), most, boxes, 5), torch.nan, dtype=torch.float64)
    objects = [normalised_boxes(group[0], [(o.frame, *o.box) for o in group[0].scene.objects])
               for group in scenes.values()]
    object_boxes = torch.full((len(texts), 1, max(len(o) for o in objects), 5), torch.nan, dtype=torch.float64)
    for b, found in enumerate(objects):
        object_boxes[b, 0, :len(found)] = found
    for b, (n, sizes, group) in enumerate(zip(lengths, block_lengths, scenes.values(), strict=True)):
        start = n - sum(sizes)
        blocks[b, :start] = 0
        for j, (size, offset, sample) in enumerate(zip(sizes, key_offsets[b], group, strict=True)):
            blocks[b, start:start + size] = j + 1
            found = normalised_boxes(sample, sample.question.boxes)
            evidence_boxes[b, j, :len(found)] = found
            if offset is not None:
                key_positions[b, j] = start + offset
                found = normalised_boxes(sample, sample.question.key_boxes)
                key_boxes[b, j, :len(found)] = found
            start += size
    batch["blocks"] = blocks
    batch["key_positions"], batch["key_boxes"], batch["evidence_boxes"] = key_positions, key_boxes, evidence_boxes
    batch["object_boxes"] = object_boxes
    if family is not None:
        batch["cell_labels"] = torch.cat([_cell_labels(s, family) for s in firsts])
    return batch


BOX_FIELDS = ("key_positions", "key_boxes", "evidence_boxes", "object_boxes")  # pack_scenes' fields for the aux losses


def _key_offset(tokenizer, key: str, ids: list[int]) -> int | None:
    """Index of the key word's token among a question block's ``ids`` (None: the question has no key word, or the
    tokenizer splits it; a BPE tokenizer spells it with its leading space)."""
    for spelling in (key, f" {key}") if key else ():
        token = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if len(token) == 1 and token[0] in ids:
            return ids.index(token[0])
    return None


def block_attention(blocks: torch.Tensor, dtype: torch.dtype, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` additive mask: causal; a block sees the prefix (block 0) and itself; padding sees itself.
    ``dropped`` (``[B, L]``, :func:`dropped_tokens`): positions that no other position sees."""
    length = blocks.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
    q, k = blocks[:, :, None], blocks[:, None, :]
    allowed = causal & ((k == 0) & (q >= 0) | (q == k)) | torch.eye(length, dtype=torch.bool, device=blocks.device)
    if dropped is not None:
        allowed = allowed & ~dropped.to(blocks.device)[:, None, :] | torch.eye(length, dtype=torch.bool,
                                                                               device=blocks.device)
    return torch.zeros(allowed.shape, dtype=dtype, device=blocks.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def block_positions(positions: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Shift each question block back so it starts right after the prefix (``positions``: ``[..., B, L]``)."""
    shift = torch.zeros_like(blocks)
    for j in range(2, int(blocks.max()) + 1):
        before = ((blocks >= 1) & (blocks < j)).sum(dim=1, keepdim=True)
        shift = torch.where(blocks == j, before, shift)
    return positions - shift


def answer_slots(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the last two tokens of every question block: the answer word and the end of turn."""
    ends = (blocks[:, :-1] >= 1) & (blocks[:, :-1] != blocks[:, 1:])
    ends = torch.cat([ends, blocks[:, -1:] >= 1], dim=1)
    rows, cols = ends.nonzero(as_tuple=True)
    return rows, cols


class AuxHead(nn.Module):
    """Predicts (shape, colour) of a visual token's cell from the visual feature entering the LLM."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.colour = nn.Linear(hidden, len(COLOURS) + 1)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.shape(features), labels[:, 0]) + F.cross_entropy(self.colour(features),
                                                                                      labels[:, 1])


VisualRows = list[tuple[TokenRegions, torch.Tensor]]


def visual_rows(adapter, batch: dict[str, torch.Tensor]) -> VisualRows:
    """Per row of a :func:`pack_scenes` batch: the regions of its visual tokens and their positions in the row
    (computed once per step, shared by :func:`box_tokens`' callers)."""
    visual = torch.isin(batch["input_ids"].cpu(), torch.tensor(adapter.visual_token_ids))
    return [(adapter.token_regions(batch, b), visual[b].nonzero().flatten()) for b in range(visual.shape[0])]


def box_tokens(rows: VisualRows, batch: dict[str, torch.Tensor], field: str, finest: bool = False) -> torch.Tensor:
    """``[B, Q, L]`` bool: for question block ``j`` of row ``b`` of a :func:`pack_scenes` batch, the visual tokens
    that overlap its boxes ``batch[field]`` (``"key_boxes"``: the objects its key word names; ``"evidence_boxes"``:
    every box the question depends on; ``"object_boxes"``: every object of the row's scene, ``Q`` = 1).
    ``finest``: only tokens of the finest resolution level (LLaVA-OneVision's thumbnail tokens see four cells)."""
    boxes_of = batch[field].cpu()
    target = torch.zeros(*boxes_of.shape[:2], batch["input_ids"].shape[1], dtype=torch.bool)
    for b, (regions, where) in enumerate(rows):
        level = regions.level == regions.level.max() if finest else torch.ones(len(regions), dtype=torch.bool)
        for j in range(boxes_of.shape[1]):
            boxes = boxes_of[b, j][~boxes_of[b, j].isnan().any(dim=1)]
            if len(boxes):
                target[b, j, where[regions.overlapping(boxes) & level]] = True
    return target


def key_targets(rows: VisualRows, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, Q, L]`` bool: the finest-level visual tokens that show the objects each question's key word names."""
    return box_tokens(rows, batch, "key_boxes", finest=True)


def dropped_tokens(rows: VisualRows, batch: dict[str, torch.Tensor], rate: float,
                   generator: torch.Generator) -> torch.Tensor:
    """``[B, L]`` bool: visual tokens removed from row ``b`` (token dropout, what pruning does: no position sees
    them). With probability ``rate`` a row loses a fraction of its empty tokens and, independently, a fraction of
    its object tokens, each drawn uniformly from ``[0, 0.95]`` (so that rows keeping mostly objects, as a
    relevance-based pruner leaves them, are as common as rows keeping a random mix). The evidence of the row's
    questions is never dropped at the finest resolution level (coarser tokens that also show it,
    LLaVA-OneVision's thumbnail, may go). Teaches the model what the pruning method presupposes of an MLLM:
    removing irrelevant tokens leaves the answer alone."""
    evidence = box_tokens(rows, batch, "evidence_boxes", finest=True).any(dim=1)
    objects = box_tokens(rows, batch, "object_boxes")[:, 0]
    visual = torch.zeros_like(evidence)
    for b, (_, where) in enumerate(rows):
        visual[b, where] = True
    hit = torch.rand(visual.shape[0], 1, generator=generator) < rate
    empty_share, object_share = (torch.rand(visual.shape[0], 1, generator=generator) * 0.95 for _ in range(2))
    draw = torch.rand(visual.shape, generator=generator)
    drop = torch.where(objects, draw < object_share, draw < empty_share)
    return hit & drop & visual & ~evidence


def key_attention_loss(layer: nn.Module, batch: dict[str, torch.Tensor], layer_input: tuple,
                       targets: torch.Tensor) -> torch.Tensor:
    """``-log`` of decoder ``layer``'s attention (mean over heads) that each question's key word pays to its
    ``targets`` (``[B, Q, L]`` bool: the visual tokens showing the objects it names, :func:`key_targets`), averaged
    over the questions that have a key word. ``layer_input``: ``(hidden_states, position_embeddings)`` that
    ``layer`` received in this step's forward."""
    positions = batch["key_positions"]
    hidden, position_embeddings = layer_input
    index = positions.clamp(min=0).to(hidden.device)
    logits = query_logits(layer, hidden, position_embeddings, index)
    mask = block_attention(batch["blocks"], torch.float32)[:, 0]
    mask = torch.gather(mask, 1, index[..., None].expand(-1, -1, logits.shape[-1]))  # [B, Q, L]
    probs = (logits + mask[:, None]).softmax(dim=-1).mean(dim=1)
    valid = (positions >= 0).to(probs.device)
    mass = (probs * targets.to(probs.device)).sum(dim=-1)[valid]
    return -torch.log(mass + 1e-6).mean() if mass.numel() else hidden.new_zeros(())


def _visual_feature_module(model: nn.Module) -> nn.Module:
    return model.model.visual.merger if hasattr(model.model, "visual") else model.model.multi_modal_projector


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(family: str, out: str | Path, *, steps: int = 3000, images: int = 16, questions: int = 4,
          lr: float = 2e-3, llm_lr: float = 7e-4, seed: int = 0, device: str = "cpu", workers: int = 0,
          video_every: int = 4,
          checkpoint_every: int = 250, eval_every: int = 250, eval_samples: int = 300, resume: bool = False,
          max_minutes: float | None = None, kinds: tuple[str, ...] = KINDS, init: str | Path | None = None,
          key_attention: float = 0.0, token_dropout: float = 0.0) -> dict:
    """Train ``family``'s world model; returns the log (also written to ``out/training_log.json``).

    ``init``: a previous run's directory whose final weights (``checkpoint/``) this run starts from, a second
    training phase with its own schedule; it skips the object-count curriculum. ``kinds``: the question kinds
    trained. ``key_attention``: weight of :func:`key_attention_loss` (0: off); ``token_dropout``: the ``rate`` of
    :func:`dropped_tokens` (0: off)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = models.build_model(family, seed=seed).to(device).train()
    aux = AuxHead(model.config.get_text_config().hidden_size).to(device)
    if init is not None:
        model.load_state_dict(load_file(Path(init) / "checkpoint" / "model.safetensors"))
        aux.load_state_dict(load_file(Path(init) / "checkpoint" / "aux.safetensors"))
    params = [*model.parameters(), *aux.parameters()]
    llm = {id(p) for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    groups = [{"params": [p for p in params if id(p) not in llm], "peak": lr},
              {"params": [p for p in params if id(p) in llm], "peak": llm_lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    log: dict = {"family": family, "steps": steps, "images": images, "questions": questions, "lr": lr,
                 "llm_lr": llm_lr, "seed": seed, "kinds": list(kinds), "init": None if init is None else str(init),
                 "key_attention": key_attention, "token_dropout": token_dropout,
                 "history": [], "train_seconds": 0.0}
    start_step = 0
    ckpt = out / "checkpoint"
    if resume and (ckpt / "state.json").exists():
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        aux.load_state_dict(load_file(ckpt / "aux.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        log = json.loads((ckpt / "state.json").read_text())
        start_step = log["next_step"]
    features: list[torch.Tensor] = []
    hook = _visual_feature_module(model).register_forward_hook(lambda m, a, o: features.append(o))
    layer_input: list[tuple] = []
    key_hook = get_adapter(model).text_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: layer_input.append((args[0], kwargs["position_embeddings"])), with_kwargs=True)
    data = Batches(family, steps, seed, images, questions, video_every, kinds=kinds, curriculum=init is None)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         sampler=range(start_step, steps), persistent_workers=workers > 0)
    warmup = max(1, steps // 20)
    began = time.perf_counter() - log["train_seconds"]
    bar = tqdm(total=steps, initial=start_step, desc=f"train {family}")
    step = start_step
    try:
        for step, batch in zip(range(start_step, steps), loader):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, steps, group["peak"], warmup)
            labels = batch.pop("cell_labels").to(device)
            batch = {k: v.to(device) for k, v in batch.items()}
            features.clear()
            layer_input.clear()
            rows = visual_rows(get_adapter(model), batch) if key_attention or token_dropout else []
            dropped = None
            if token_dropout:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
                dropped = dropped_tokens(rows, batch, token_dropout, generator)
            answer_loss = answer_loss_of(model, batch, dropped)
            aux_loss = aux.loss(features[0].reshape(-1, features[0].shape[-1]), labels)
            loss = answer_loss + aux_loss
            if key_attention:
                key_loss = key_attention_loss(get_adapter(model).text_model.layers[0], batch, layer_input[0],
                                              key_targets(rows, batch))
                loss = loss + key_attention * key_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(answer=f"{answer_loss.item():.3f}", aux=f"{aux_loss.item():.3f}",
                            **({"key": f"{key_loss.item():.3f}"} if key_attention else {}))
            done = step + 1
            entry = None
            if done % eval_every == 0 or done == steps:
                model.eval()
                with torch.no_grad():
                    entry = {"step": done, "answer_loss": answer_loss.item(), "aux_loss": aux_loss.item(),
                             **({"key_loss": key_loss.item()} if key_attention else {}),
                             "objects": data.object_counts(step),
                             "minutes": (time.perf_counter() - began) / 60,
                             **answer_accuracy(model, data.processor, eval_samples, family=family)}
                model.train()
                log["history"].append(entry)
                bar.write(json.dumps(entry))
            if done % checkpoint_every == 0 or done == steps:
                log.update(next_step=done, train_seconds=time.perf_counter() - began)
                _checkpoint(ckpt, model, aux, optimizer, log)
            if max_minutes is not None and time.perf_counter() - began > 60 * max_minutes:
                bar.write(f"stopping after {max_minutes} minutes at step {done}")
                break
    finally:
        hook.remove()
        key_hook.remove()
        bar.close()
    log.update(next_step=step + 1, train_seconds=time.perf_counter() - began)
    _checkpoint(ckpt, model, aux, optimizer, log)
    model.eval().save_pretrained(out)
    data.processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
    return log


def answer_loss_of(model: nn.Module, batch: dict[str, torch.Tensor], dropped: torch.Tensor | None = None,
                   answer_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of every block's answer and end of turn, on a :func:`pack_scenes` batch (``dropped``: see
    :func:`block_attention`). ``answer_lengths``: tokens of each block's answer, blocks in row-major order (None:
    one token each, the world tokenizer's words)."""
    batch = {k: v for k, v in batch.items() if k not in BOX_FIELDS}
    blocks = batch.pop("blocks")
    mask2d = batch.pop("attention_mask")
    if hasattr(model.model, "compute_3d_position_ids"):
        positions = model.model.compute_3d_position_ids(
            input_ids=batch["input_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=mask2d,
            mm_token_type_ids=batch.get("mm_token_type_ids"), inputs_embeds=None, **with_cache(None))
    else:
        positions = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks)
    hidden = model.model(**batch, attention_mask=block_attention(blocks, model.dtype, dropped),
                         position_ids=block_positions(positions, blocks), use_cache=False).last_hidden_state
    rows, ends = answer_slots(blocks)
    predicted = 1 + (torch.ones_like(ends) if answer_lengths is None else answer_lengths.to(ends.device))
    offsets = torch.arange(int(predicted.max()), device=ends.device)
    valid = offsets < predicted[:, None]
    targets_at = torch.where(valid, ends[:, None] - predicted[:, None] + 1 + offsets, ends[:, None])
    logits = model.lm_head(hidden[rows[:, None], targets_at - 1])
    return F.cross_entropy(logits[valid], batch["input_ids"][rows[:, None], targets_at][valid])


def _checkpoint(directory: Path, model: nn.Module, aux: nn.Module, optimizer, log: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, directory / "model.safetensors")  # untie
    save_file(aux.state_dict(), directory / "aux.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps(log))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=models.FAMILIES, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--images", type=int, default=16, help="scenes per step")
    parser.add_argument("--questions", type=int, default=4, help="questions per scene")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the vision tower and aux head")
    parser.add_argument("--llm-lr", type=float, default=7e-4, help="peak learning rate of the language model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes")
    parser.add_argument("--video-every", type=int, default=4, help="Qwen2-VL: every n-th step is a video batch")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kinds", default=",".join(KINDS), help="question kinds to train, comma-separated")
    parser.add_argument("--init", default=None,
                        help="start from the final weights of this earlier run directory (a second phase)")
    parser.add_argument("--key-attention", type=float, default=0.0,
                        help="weight of the loss that teaches layer 0 to attend from the question's key word to "
                             "the objects it names (0: off)")
    parser.add_argument("--token-dropout", type=float, default=0.0,
                        help="share of questions that lose a random part of the visual tokens they do not depend on")
    args = parser.parse_args(argv)
    train(args.family, args.out, steps=args.steps, images=args.images, questions=args.questions, lr=args.lr,
          llm_lr=args.llm_lr,
          seed=args.seed, device=args.device, workers=args.workers, video_every=args.video_every,
          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_samples=args.eval_samples,
          resume=args.resume, max_minutes=args.max_minutes, kinds=tuple(args.kinds.split(",")), init=args.init,
          key_attention=args.key_attention, token_dropout=args.token_dropout)


if __name__ == "__main__":
    main()
