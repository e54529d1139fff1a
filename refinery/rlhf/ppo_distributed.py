"""PPO on several processes (torchrun): data parallel over the step's episodes, one shared update.

Each rank samples, scores and evaluates (reference log-probs, values, RM scores) its own contiguous share of
the step's prompts; the step's rollouts and per-token numbers are then gathered, so every rank holds the whole
batch in the layout a one-process run would have built (prompts left-padded to the widest prompt, responses
right-padded to the longest answer) and computes the same score normaliser, KL, KL controller update, GAE and
whitened advantages. Each global mini-batch is split into equal shares; a rank's loss is weighted by its share
of the mini-batch's response tokens, and the gradients are averaged across ranks before clipping, so the update
is the one-process update on the same global mini-batch up to float summation order.

Why not DDP around the models: a PPO step runs no-grad forwards through the same modules (rollouts, reference
with the adapter off, the adapter-off judge on the value model) between the updates, and two models update in
one backward; DistributedDataParallel's hooks and its unused-parameter bookkeeping assume one forward-backward
per wrapped model. One flat all-reduce of the trained gradients (a few MB for LoRA) is all the update needs.
Process groups and collectives are accelerate's (`PartialState`, `gather`, `pad_across_processes`): gloo on
CPU, NCCL on CUDA, each rank on its own GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from refinery.ops.distributed import world_size
from refinery.rlhf.rollout import Rollout


@dataclass
class Ranks:
    world: int = 1
    rank: int = 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        """The ranks torchrun started (WORLD_SIZE/RANK), with the process group up; one rank otherwise."""
        if world_size() <= 1:
            return cls()
        from accelerate import PartialState

        # cpu=True on a machine without CUDA: accelerate otherwise reports DistributedType.NO under torchrun on a
        # CPU (num_processes 1, and its gather() a no-op), so every rank would silently run the whole batch alone
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes != world_size():
            raise RuntimeError(f"accelerate sees {state.num_processes} processes, torchrun started {world_size()}")
        return cls(state.num_processes, state.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous share of the step's prompts (ranks in order rebuild the batch's order)."""
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def mini_batch_share(self, mb: torch.Tensor) -> torch.Tensor:
        return mb.chunk(self.world)[self.rank] if self.world > 1 else mb

    def gather_rollout(self, r: Rollout, pad_id: int, per_token: list[torch.Tensor], per_episode: list[torch.Tensor]):
        """Every rank's rollout and its [B, R] / [B] tensors, concatenated in rank order with one layout."""
        if self.world == 1:
            return r, per_token, per_episode
        from accelerate.utils import gather, pad_across_processes

        prompt, response = r.sequences[:, :r.prompt_width], r.sequences[:, r.prompt_width:]
        prompt_mask = r.attention_mask[:, :r.prompt_width]
        # left-pad prompts (pad_first) and right-pad responses to the widest on any rank
        prompt = gather(pad_across_processes(prompt, dim=1, pad_index=pad_id, pad_first=True))
        prompt_mask = gather(pad_across_processes(prompt_mask, dim=1, pad_index=0, pad_first=True))
        response = gather(pad_across_processes(response, dim=1, pad_index=pad_id))
        response_mask = gather(pad_across_processes(r.response_mask, dim=1, pad_index=0))
        width = prompt.shape[1]
        merged = Rollout(torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1), response_mask,
                         width, gather(r.has_eos.long()).bool(), r.padding_free)
        tokens = [gather(pad_across_processes(t.contiguous(), dim=1, pad_index=0)) for t in per_token]
        return merged, tokens, [gather(t.contiguous()) for t in per_episode]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of each trained parameter's gradient over ranks (one flat all-reduce)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over ranks (the mini-batch statistics, already weighted by token share)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()

