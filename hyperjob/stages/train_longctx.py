"""The long-context options (hyperjob.longctx) wired into the transformers Trainer (backends cpu and cuda).

Imported only by the train process (it imports torch and transformers). What it changes, and only when the config
asks for it:
- the loss (`training.loss` other than standard, or sequence parallelism): the model runs without its LM head
  (`logits_to_keep` selects no position, so no [tokens, vocab] logits exist), a forward hook takes the decoder's
  final hidden states, and `hyperjob.longctx.chunked_loss.lm_loss` computes the loss from them;
- sequence parallelism (`parallel.sequence` > 1): every rank of an SP group gets the same micro-batch (a sampler over
  the data-parallel ranks only), keeps its slice of the sequence (`ulysses.shard_batch`), and attention gathers the
  sequence by all-to-all (`ulysses.enable`);
- the tiled MLP (`training.mlp_chunk`) and activation offload (`training.activation_offload`).
With none of them set, the stock Trainer runs unchanged.

Loss scaling: transformers counts the label tokens of the whole optimizer step (`num_items_in_batch`, summed over the
world when `average_tokens_across_devices`) and DDP averages gradients over the world. The ranks of an SP group all
count the same full batch and each holds a part of its tokens, so the loss of rank r is
`local_sum_r * SP * (world if summed over the world else 1) / num_items`: with SP=1 exactly transformers' own loss,
and with SP=k the gradients of SP=1 on the same global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from hyperjob.config.models import HyperjobConfig
from hyperjob.stages.common import StageError


def needs_own_loss(cfg: HyperjobConfig) -> bool:
    return cfg.training.loss != "standard" or cfg.parallel.sequence > 1


def own_offload(cfg: HyperjobConfig) -> bool:
    """Activation offload done here (save_on_cpu around reentrant checkpoints); under FSDP2 accelerate's own
    offload of each checkpointed layer does it (parallel_modes.mode_environment)."""
    return cfg.training.activation_offload and cfg.parallel.mode != "fsdp2"


def customised(cfg: HyperjobConfig) -> bool:
    """Whether the stock Trainer needs this module at all."""
    return needs_own_loss(cfg) or own_offload(cfg)


def check_kernel(cfg: HyperjobConfig) -> None:
    """A fused loss kernel that is not installed fails before the model loads, saying what to install."""
    from hyperjob.longctx.chunked_loss import require_kernel

    try:
        require_kernel(cfg.training.loss)
    except ImportError as e:
        raise StageError(f"training.loss: {e}") from None


def sequence_group(cfg: HyperjobConfig) -> Any:
    """The SP process groups (collective: every rank calls it, after torch.distributed is initialised)."""
    if cfg.parallel.sequence == 1:
        return None
    from hyperjob.longctx.ulysses import sp_group

    return sp_group(cfg.parallel.sequence)


def prepare_model(model: Any, cfg: HyperjobConfig, group: Any) -> list[str]:
    """Patch the (peft-wrapped) model for the configured options; return lines saying what was done."""
    done: list[str] = []
    t = cfg.training
    if t.mlp_chunk:
        from hyperjob.longctx.tiled_mlp import tile_mlp

        done.append(f"tiled MLP: {tile_mlp(model, t.mlp_chunk)} MLPs run {t.mlp_chunk} tokens at a time")
    if group is not None:
        from hyperjob.longctx.ulysses import enable

        enable(model, group)
        done.append(f"Ulysses sequence parallelism: {group.size} ranks per sample, DP {group.dp_size}")
    if own_offload(cfg):
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad (LoRA)
        done.append("activation offload: checkpointed activations kept in host memory")
    if needs_own_loss(cfg):
        done.append(f"loss: {t.loss} (LM head chunk {t.loss_chunk} tokens)" if t.loss != "standard" else "loss: SP")
    return done


def _unwrapped(model: Any) -> Any:
    """The PeftModel (or plain model) inside DDP / FSDP wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    inner = _unwrapped(model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


@contextlib.contextmanager
def _capture_hidden(decoder: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the decoder's final hidden states during one forward."""
    seen: list[torch.Tensor] = []

    def hook(_module: Any, _args: Any, output: Any) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def forward_hidden(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the (possibly DDP-wrapped) model through its own forward, so data-parallel bookkeeping still happens,
    but with no logits; return the final hidden states [batch, seq, hidden]."""
    lm = _causal_lm(model)
    device = inputs["input_ids"].device
    nothing = torch.empty(0, dtype=torch.long, device=device)  # logits for no position
    with _capture_hidden(lm.get_decoder()) as seen:
        model(**inputs, logits_to_keep=nothing, use_cache=False)
    if len(seen) != 1:
        raise RuntimeError(f"expected one decoder forward, saw {len(seen)}")
    return seen[0]


def scaled_loss(
    loss_sum: torch.Tensor, count: torch.Tensor, num_items: Any, *, sp: int, world_summed: bool, world: int, group: Any
) -> torch.Tensor:
    """The loss whose gradients, after DDP's average over the world, equal those of SP=1 (module docstring)."""
    if num_items is None:  # no step-wide count: token-weighted over this micro-batch (ulysses.sp_loss)
        from hyperjob.longctx.ulysses import SPGroup, sp_loss

        return sp_loss(loss_sum, count, group or SPGroup.single())
    scale = world if world_summed else 1
    return loss_sum / num_items * (scale * sp)


def trainer_class(cfg: HyperjobConfig, group: Any) -> type:
    """A Trainer subclass with the configured loss, SP data sharding and activation offload."""
    from transformers import Trainer

    from hyperjob.longctx.chunked_loss import lm_loss
    from hyperjob.longctx.ulysses import shift_labels

    t = cfg.training

    class LongContextTrainer(Trainer):
        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if not needs_own_loss(cfg):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            if group is not None:
                from hyperjob.longctx.ulysses import shard_batch

                inputs = shard_batch({**inputs, "labels": labels}, group)
                targets = inputs.pop("shift_labels")
                inputs.pop("labels", None)
            else:
                targets = shift_labels(labels, inputs.get("position_ids"))
            hidden = forward_hidden(model, inputs)
            head = _causal_lm(model).get_output_embeddings()
            loss_sum, count = lm_loss(hidden, targets, head, impl=t.loss, chunk=t.loss_chunk)
            loss = scaled_loss(
                loss_sum, count, num_items_in_batch, sp=cfg.parallel.sequence,
                world_summed=self.args.average_tokens_across_devices and self.args.world_size > 1,
                world=self.accelerator.num_processes, group=group,
            )  # fmt: skip
            return (loss, None) if return_outputs else loss

        def compute_loss_context_manager(self) -> Any:
            base = super().compute_loss_context_manager()
            if not own_offload(cfg):
                return base
            stack = contextlib.ExitStack()
            stack.enter_context(base)
            pin = self.args.device.type == "cuda"
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=pin))
            return stack

        def get_train_dataloader(self) -> Any:
            if group is None:
                return super().get_train_dataloader()
            return sp_dataloader(self, group)

    return LongContextTrainer


class _EpochLoader(torch.utils.data.DataLoader[Any]):
    """A DataLoader whose sampler reshuffles per epoch when the Trainer calls set_epoch."""

    def set_epoch(self, epoch: int) -> None:
        sampler = self.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            sampler.set_epoch(epoch)


def sp_dataloader(trainer: Any, group: Any) -> Any:
    """Micro-batches drawn over the data-parallel ranks only: every rank of an SP group gets the same batch.

    accelerate would shard over all processes, giving the ranks of one sample different samples.
    """
    args = trainer.args
    sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(
        trainer.train_dataset, num_replicas=group.dp_size, rank=group.dp_rank, shuffle=True,
        seed=args.data_seed if args.data_seed is not None else args.seed, drop_last=args.dataloader_drop_last,
    )  # fmt: skip
    return _EpochLoader(
        trainer.train_dataset, batch_size=trainer._train_batch_size, sampler=sampler,
        collate_fn=trainer.data_collator, drop_last=args.dataloader_drop_last, num_workers=0,
    )  # fmt: skip
