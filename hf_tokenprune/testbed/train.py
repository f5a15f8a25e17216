"""Teach the real-weights LLaVA the world's questions: ``python -m hf_tokenprune.testbed.train --out DIR [--resume]
[--max-minutes M] [--init PREVIOUS_RUN] [--lora-rank R]``.

Trained: the projector and, with ``--lora-rank``, a LoRA (``peft``) on the attention projections of the LM's layers
1-29. The LM's own weights (SmolLM2-135M-Instruct, 30 layers) and the vision tower (DINOv2-small) stay frozen, and
layer 0 gets no LoRA, so the first-layer attention the method reads is the pretrained layer's (over the trained
projector's embeddings). An auxiliary loss (as :mod:`..world.train`'s) has a linear head read each visual token's
cell (shape, colour or nothing) from the projector's output.

World scenes (16 x 16 cells of 8 px, rendered at 128 px) are resized to 224 px: one DINOv2 patch per cell, 256
visual tokens. The recipe carries over from :mod:`..world.train`: several questions per scene share its image
prefix in one packed row (:func:`~..world.train.pack_scenes`), an object-count curriculum, AdamW with warm-up and
cosine decay, checkpoints every ``--checkpoint-every`` steps from which ``--resume`` continues with the same data
(batches depend on ``(seed, step)`` only), a progress bar and a periodic held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..world.evaluate import accuracy, heldout_samples
from ..world.scenes import CELL, COLOURS, SHAPES, Sample, make_samples
from ..world.train import STEP_STRIDE, AuxHead, _lr, _token_grid, answer_loss_of, key_attention_loss, pack_scenes
from .model import LORA, PROJECTOR, add_lora, attach_lora, base, projector, save_trained

KINDS = ("colour_of_shape", "shape_of_colour", "count_of_colour", "majority_colour")
OBJECTS = (16, 48)  # objects per scene after the curriculum, and in the held-out evaluation
CURRICULUM = ((0.0, (8, 16)), (0.15, (16, 32)), (0.3, (24, 48)), (0.45, (32, 64)), (0.6, (48, 96)))


def object_range(progress: float, objects: tuple[int, int] = OBJECTS) -> tuple[int, int]:
    """Objects per scene at ``progress`` (0-1) of a run that ends on ``objects``: the :data:`CURRICULUM` stages
    below ``objects``, then ``objects``."""
    below = [stage for stage in CURRICULUM if stage[1][1] < objects[1]]  # CURRICULUM grows stage by stage
    final_start = CURRICULUM[min(len(below), len(CURRICULUM) - 1)][0]
    return [r for start, r in [*below, (final_start, objects)] if progress >= start][-1]


def step_samples(step: int, steps: int, seed: int, images: int, questions: int, kinds: tuple[str, ...] = KINDS,
                 objects: tuple[int, int] = OBJECTS, curriculum: bool = True) -> list[Sample]:
    """Training step ``step``'s scenes and questions, from ``(seed, step)`` alone (``curriculum=False``: every
    step on ``objects``)."""
    low, high = object_range(step / steps if curriculum else 1.0, objects)
    rng = random.Random(f"testbed/{seed}/{step}")
    out = []
    for i in range(images):
        n = rng.randint(low, high)
        out += make_samples("train", step * STEP_STRIDE + i, seed=seed, per_scene=questions, n_objects=(n, n),
                            kinds=kinds)
    return out


def train(out: str | Path, *, steps: int = 600, images: int = 2, questions: int = 8, lr: float = 1e-3,
          lora_rank: int = 0, lora_lr: float = 3e-4, aux: float = 1.0, words: float = 0.0, key_attention: float = 0.0,
          key_layer: int = 10, kinds: tuple[str, ...] = KINDS, objects: tuple[int, int] = OBJECTS,
          curriculum: bool = True, init: str | Path | None = None, device: str = "cpu",
          seed: int = 0, checkpoint_every: int = 10, eval_every: int = 100, eval_samples: int = 60,
          resume: bool = False, max_minutes: float | None = None, cache_dir: Path | None = None) -> dict:
    """Train the projector (and a LoRA of ``lora_rank``; 0: none), starting from the trained weights of ``init``
    (an earlier run's directory; its auxiliary head too where its checkpoint is there) if given; ``aux``: weight
    of the auxiliary cell loss; ``words``: weight of :func:`word_loss` (object tokens towards the LM's embeddings
    of their colour and shape words; 0: off); ``key_attention``: weight of
    :func:`~..world.train.key_attention_loss` on LM layer ``key_layer`` (never 0: the first layer stays as
    pretrained), which has the question's key word attend to the objects it names (0: off); ``kinds``: the question
    kinds trained (and asked in the held-out evaluation); ``objects``: objects per scene after the curriculum
    (``curriculum=False``: from the first step) and in the held-out evaluation. Writes
    ``out/projector.safetensors`` (``out/lora/``), the processor and ``out/training_log.json`` (returned)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = base(cache_dir)
    peft_model = add_lora(model, lora_rank) if lora_rank else None
    if init is not None:
        projector(model).load_state_dict(load_file(Path(init) / PROJECTOR))
        if (Path(init) / LORA).exists():
            if peft_model is not None:
                raise ValueError(f"{init} has a LoRA already: continue it without --lora-rank")
            peft_model = attach_lora(model, Path(init) / LORA, trainable=True)
    model.to(device)
    head = AuxHead(model.config.text_config.hidden_size).to(device)
    if init is not None and (Path(init) / "checkpoint" / "aux.safetensors").exists():
        # a fresh head upsets the trained projector for its first ~200 steps
        head.load_state_dict(load_file(Path(init) / "checkpoint" / "aux.safetensors"))
    groups = [{"params": [*projector(model).parameters(), *head.parameters()], "peak": lr}]
    if peft_model is not None:
        groups.append({"params": [p for n, p in peft_model.named_parameters() if "lora_" in n], "peak": lora_lr})
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    log: dict = {"steps": steps, "images": images, "questions": questions, "lr": lr, "lora_rank": lora_rank,
                 "lora_lr": lora_lr, "aux": aux, "words": words, "key_attention": key_attention, "key_layer": key_layer,
                 "init": None if init is None else str(init), "seed": seed,
                 "kinds": list(kinds), "objects": list(objects), "curriculum": curriculum, "history": [],
                 "train_seconds": 0.0}
    ckpt = out / "checkpoint"
    start = 0
    if resume and (ckpt / "state.json").exists():
        projector(model).load_state_dict(load_file(ckpt / PROJECTOR))
        if peft_model is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, load_file(ckpt / LORA / "adapter_model.safetensors"))
        head.load_state_dict(load_file(ckpt / "aux.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        log = json.loads((ckpt / "state.json").read_text())
        start = log["next_step"]
    vocabulary = tuple(t.to(device) for t in word_embeddings(model, processor.tokenizer))
    if key_attention and not 0 < key_layer < len(model.model.language_model.layers):
        raise ValueError(f"key_layer must be an LM layer other than 0, got {key_layer}")
    features: list[torch.Tensor] = []
    layer_input: list[tuple] = []
    key_module = model.model.language_model.layers[key_layer]
    hooks = [projector(model).register_forward_hook(lambda module, args, output: features.append(output))]
    if key_attention:
        hooks.append(key_module.register_forward_pre_hook(
            lambda module, args, kwargs: layer_input.append((args[0] if args else kwargs["hidden_states"],
                                                             kwargs["position_embeddings"])), with_kwargs=True))
    heldout = heldout_samples(eval_samples, n_objects=objects, kinds=kinds)
    warmup = max(1, steps // 20)
    began = time.perf_counter() - log["train_seconds"]
    bar = tqdm(total=steps, initial=start, desc="train testbed projector")
    done = start
    model.train()
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, steps, group["peak"], warmup)
            samples = step_samples(step, steps, seed, images, questions, kinds, objects, curriculum)
            lengths = torch.tensor([len(processor.tokenizer(s.question.answer, add_special_tokens=False)["input_ids"])
                                    for s in samples])  # "triangle", "diamond": two tokens
            features.clear()
            layer_input.clear()
            batch = {k: v.to(device) for k, v in pack_scenes(processor, samples, None).items()}
            answer = answer_loss_of(model, batch, answer_lengths=lengths)
            cells = cell_labels(samples).to(device)
            parts = {"answer_loss": answer, "aux_loss": head.loss(features[0].flatten(0, 1), cells)}
            if words:
                parts["word_loss"] = word_loss(features[0].flatten(0, 1), cells, vocabulary)
            if key_attention:
                parts["key_loss"] = key_attention_loss(key_module, batch, layer_input[0],
                                                       key_cells(samples, batch, model.config.image_token_id))
            weights = {"answer_loss": 1.0, "aux_loss": aux, "word_loss": words, "key_loss": key_attention}
            loss = sum(weights[name] * value for name, value in parts.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            done = step + 1
            bar.update(1)
            bar.set_postfix(answer=f"{answer.item():.3f}", loss=f"{loss.item():.3f}",
                            objects=object_range(step / steps if curriculum else 1.0, objects))
            log["history"].append({"step": done, "loss": round(loss.item(), 4),
                                   **{name: round(value.item(), 4) for name, value in parts.items()}})
            if done % eval_every == 0 or done == steps:
                model.eval()
                result = accuracy(model, processor, heldout, batch_size=16)
                model.train()
                log.setdefault("evaluations", []).append({"step": done, **result})
                bar.write(json.dumps({"step": done, "heldout": result}))
            if done % checkpoint_every == 0 or done == steps:
                _checkpoint(ckpt, model, peft_model, head, optimizer, log, done, began)
            if max_minutes is not None and time.perf_counter() - began > 60 * max_minutes:
                bar.write(f"stopping after {max_minutes} minutes at step {done}; continue with --resume")
                break
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    _checkpoint(ckpt, model, peft_model, head, optimizer, log, done, began)
    save_trained(model, out, peft_model)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def word_embeddings(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``([shapes + 1, hidden], [colours + 1, hidden])``: the LM's input embedding of each shape and colour word (its
    first token, with the leading space) in :data:`~..world.scenes.SHAPES` / :data:`~..world.scenes.COLOURS` order,
    after row 0 for an empty cell: " empty" and zero."""
    table = model.get_input_embeddings().weight.detach()

    def embedding(word: str) -> torch.Tensor:
        return table[tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]]

    shapes = torch.stack([embedding("empty"), *map(embedding, SHAPES)])
    colours = torch.stack([torch.zeros(table.shape[1]), *map(embedding, COLOURS)])
    return shapes, colours


def word_loss(features: torch.Tensor, cells: torch.Tensor, vocabulary: tuple[torch.Tensor, torch.Tensor]
              ) -> torch.Tensor:
    """Mean squared distance of each visual token's projected feature (``[N, hidden]``; ``cells``: its
    :func:`cell_labels`) to the sum of the LM's embeddings of its shape and colour words (:func:`word_embeddings`;
    an empty cell: " empty"): the visual token then reads, to the LM, like the words that name what it shows."""
    shapes, colours = vocabulary
    target = shapes[cells[:, 0]] + colours[cells[:, 1]]
    return (features - target.to(features.dtype)).pow(2).sum(-1).mean()


def cell_labels(samples: list[Sample]) -> torch.Tensor:
    """``[scenes * 256, 2]`` (shape + 1, colour + 1; 0 = nothing) of each scene's 16 x 16 visual tokens, row-major,
    scenes in the order :func:`~..world.train.pack_scenes` packs them (one DINOv2 patch per 8-pixel cell)."""
    scenes = {id(s.scene): s for s in samples}.values()
    return torch.cat([_token_grid(s.scene, s.media, 0, 8).reshape(-1, 2) for s in scenes])


def key_cells(samples: list[Sample], batch: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """``[B, Q, L]`` bool: for question block ``j`` of row ``b`` of a :func:`~..world.train.pack_scenes` batch, the
    visual tokens (one per 8-pixel cell, row-major) of the objects its key word names."""
    image = (batch["input_ids"] == image_token_id).cpu()
    targets = torch.zeros(*batch["key_positions"].shape, batch["input_ids"].shape[1], dtype=torch.bool)
    scenes: dict[int, list[Sample]] = {}
    for sample in samples:
        scenes.setdefault(id(sample.scene), []).append(sample)
    for b, group in enumerate(scenes.values()):
        where = image[b].nonzero().flatten()
        cols = group[0].scene.cols
        for j, sample in enumerate(group):
            for _, x0, y0, _, _ in sample.question.key_boxes:
                targets[b, j, where[(y0 // CELL) * cols + x0 // CELL]] = True
    return targets


def _checkpoint(directory: Path, model, peft_model, head: AuxHead, optimizer, log: dict, done: int,
                began: float) -> None:
    log.update(next_step=done, train_seconds=time.perf_counter() - began)
    save_trained(model, directory, peft_model)
    save_file(head.state_dict(), directory / "aux.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "state.json").write_text(json.dumps(log))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=2, help="scenes per step")
    parser.add_argument("--questions", type=int, default=8, help="questions per scene (at most, of the scene's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector and aux head")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on layers 1-29's attention (0: none)")
    parser.add_argument("--lora-lr", type=float, default=3e-4)
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary cell loss")
    parser.add_argument("--words", type=float, default=0.0,
                        help="weight of the loss that moves object tokens towards their colour + shape word embeddings")
    parser.add_argument("--key-attention", type=float, default=0.0,
                        help="weight of the loss that has --key-layer's attention go from the question's key word to "
                             "the objects it names (0: off)")
    parser.add_argument("--key-layer", type=int, default=10, help="LM layer of --key-attention (not 0)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="question kinds to train, comma-separated")
    parser.add_argument("--objects", type=int, nargs=2, default=OBJECTS, metavar=("LOW", "HIGH"),
                        help="objects per scene after the curriculum and in the held-out evaluation")
    parser.add_argument("--no-curriculum", dest="curriculum", action="store_false",
                        help="every step on --objects (a later phase)")
    parser.add_argument("--init", default=None, help="start from the trained weights of this earlier run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=60)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    train(args.out, steps=args.steps, images=args.images, questions=args.questions, lr=args.lr,
          lora_rank=args.lora_rank, lora_lr=args.lora_lr, aux=args.aux, words=args.words,
          key_attention=args.key_attention,
          key_layer=args.key_layer, kinds=tuple(args.kinds.split(",")), objects=tuple(args.objects),
          curriculum=args.curriculum, init=args.init, device=args.device, seed=args.seed,
          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_samples=args.eval_samples,
          resume=args.resume, max_minutes=args.max_minutes)


if __name__ == "__main__":
    main()
