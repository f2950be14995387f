"""The engine's blocks, read from the checkpoint one at a time and written out when done.

`StreamedBlocks` is the calibration engine's `BlockAccess` for a model whose weights stay in their
files: `open` reads block k (compute dtype) and runs the recipe's steps that come before the
calibrated one; `close` runs the steps after it, writes the block's weights and records, the next
block's inputs and the state, then drops the block back to the meta device.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from slimkit.calibration.engine import ActivationStore, BlockAccess
from slimkit.compression.report import LayerTally
from slimkit.io.tensors import save_tensors_atomic
from slimkit.models.layouts import to_checkpoint, transposed_in_checkpoint
from slimkit.models.streamed import StreamedModel
from slimkit.progress import NoProgress
from slimkit.recipes.base import StepConfig
from slimkit.recipes.builtin_steps import handler_for
from slimkit.recipes.context import StepContext
from slimkit.recipes.state import save_compression_state
from slimkit.streaming.work import StreamState, WorkDir


class StreamedBlocks(BlockAccess):
    def __init__(self, streamed: StreamedModel, ctx: StepContext, work: WorkDir, state: StreamState,
                 before: list[StepConfig], after: list[StepConfig], save_dtype: torch.dtype):
        self.streamed, self.ctx, self.work, self.state = streamed, ctx, work, state
        self.before, self.after, self.save_dtype = before, after, save_dtype

    def model_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.streamed.embed(batch)}

    def resume(self, store: ActivationStore) -> int:
        if self.state.next_block:
            inputs, dense = self.work.load_activations()
            for i, x in enumerate(inputs):
                store.put(i, x)
            if dense:
                store.dense = ActivationStore()
                for i, x in enumerate(dense):
                    store.dense.put(i, x)
        return self.state.next_block

    def open(self, index: int, block: nn.Module) -> None:
        start = time.perf_counter()
        self.streamed.materialize(block)
        for linear in self.streamed.adapter.for_block(index).block_linears(block).values():
            self.state.baseline_zeros += int((linear.weight == 0).sum())
            self.state.baseline_total += linear.weight.numel()
        self.state.add_time("read_s", time.perf_counter() - start)
        self._steps(self.before)

    def close(self, index: int, block: nn.Module, store: ActivationStore | None) -> None:
        self._steps(self.after)
        start = time.perf_counter()
        self._write(index, block)
        if store is not None and index + 1 < len(self.streamed.adapter.get_blocks(self.streamed.model)):
            dense = store.dense
            self.work.save_activations([store[i] for i in range(len(store))],
                                       [dense[i] for i in range(len(dense))] if dense is not None else [])
        self.state.next_block = index + 1
        self.work.save_state(self.state)
        self.streamed.release(block)
        self.state.add_time("write_s", time.perf_counter() - start)

    def _steps(self, steps: list[StepConfig]) -> None:
        """Per-tensor steps on the block just read (quietly: the blocks' progress is shown)."""
        if not steps:
            return
        start, shown = time.perf_counter(), self.ctx.run.progress
        self.ctx.run.progress = NoProgress()
        try:
            for step in steps:
                handler_for(step)(step, self.ctx)
        finally:
            self.ctx.run.progress = shown
        self.state.add_time("per_tensor_steps_s", time.perf_counter() - start)

    def _write(self, index: int, block: nn.Module) -> None:
        """The block's records, then its tensors (as the checkpoint names them, in the save dtype;
        each converted in place, so the block never exists twice in memory)."""
        prefix = self.streamed.prefix(block)
        records = {n: r for n, r in self.ctx.state.records.items() if n.startswith(prefix)}
        params = {prefix + n: p for n, p in block.named_parameters()}
        tally = LayerTally.of(records, params, self.streamed.source_dtype.itemsize)
        save_compression_state(records, self.work.layout.block_records(index))
        total = LayerTally.from_dict(self.state.tally)
        total.add(tally)
        self.state.tally = total.to_dict()
        for name in records:  # codes and masks are on disk now; keep RAM to one block
            del self.ctx.state.records[name]
        for tensor in [*block.parameters(), *block.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(self.save_dtype)
        own = to_checkpoint(block.state_dict(), transposed_in_checkpoint(block))
        tensors = {n: own[n[len(prefix):]] for n in self.streamed.shards.under(prefix)}
        save_tensors_atomic(tensors, self.work.layout.block_weights(index))
