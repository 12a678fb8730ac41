"""Pre-training batches from token shards: a mixture of sources, packed windows, resumable.

Each source is its shards' tokens read as one stream (documents end with <|endoftext|>). A training
sequence is the next `seq_len + 1` tokens of one source's stream (inputs and shifted labels), cut
without regard to document ends; the document offsets tell which document each token belongs to,
so attention stays inside documents and positions restart (qwen2.model.transformer). A stream that
runs out starts over (a new epoch of that source).

Which source each sequence comes from is drawn with the mixture weights of the moment (a recipe may
change them per stage or by progress: dynamic data sampling), from one seeded generator. Every
process draws the same global batch and takes its own rows, so 1 or N processes see the same
data for the same global batch. `state_dict()` (generator state, each stream's position) goes
into the checkpoint; loading it continues the exact sequence of batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen2.data.readers import DataError
from qwen2.data.shards import TokenShard


@dataclass
class Batch:
    input_ids_BT: torch.Tensor  # int64
    labels_BT: torch.Tensor  # int64, the next token of each position
    document_ids_BT: torch.Tensor  # int64, equal within a document (for the attention mask and positions)
    sources: list[str]  # where each row came from

    @property
    def num_tokens(self) -> int:
        return self.labels_BT.numel()


class TokenStream:
    """The tokens of some shards as one endless stream with a cursor (and an epoch count)."""

    def __init__(self, shards: list[TokenShard]) -> None:
        if not shards:
            raise DataError("a data source has no shards")
        self.shards = shards
        self.offsets = np.cumsum([0] + [s.num_tokens for s in shards])
        # Global document starts (token index in the stream) for document ids.
        self.doc_starts = np.concatenate([s.doc_starts.astype(np.int64) + int(o) for s, o in zip(shards, self.offsets)])
        self.total = int(self.offsets[-1])
        self.position = 0
        self.epoch = 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n tokens and their (stream-wide) document numbers; the cursor moves n - 1 ahead,
        so consecutive windows share one token (the last label of one is the first input of the next)."""
        if n > self.total:
            raise DataError(f"a data source holds {self.total} tokens, fewer than one sequence of {n}")
        if self.position + n > self.total:
            self.position, self.epoch = 0, self.epoch + 1
        start, end = self.position, self.position + n
        pieces = []
        for i, shard in enumerate(self.shards):
            lo, hi = max(start, int(self.offsets[i])), min(end, int(self.offsets[i + 1]))
            if lo < hi:
                pieces.append(np.asarray(shard.tokens[lo - self.offsets[i]:hi - self.offsets[i]]))
        documents = np.searchsorted(self.doc_starts, np.arange(start, end), side="right") - 1
        self.position = end - 1
        return np.concatenate(pieces).astype(np.int64), documents

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        if state["total"] != self.total:
            raise DataError(f"the data changed since the checkpoint: a source now holds {self.total} tokens, "
                            f"the checkpoint's held {state['total']}")
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


class MixtureLoader:
    """Global batches of packed sequences drawn from named sources by mixture weights."""

    def __init__(self, sources: dict[str, list[TokenShard]], *, seed: int) -> None:
        if not sources:
            raise DataError("no data sources")
        self.names = sorted(sources)
        self.streams = {name: TokenStream(sources[name]) for name in self.names}
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next_batch(self, batch_size: int, seq_len: int, weights: dict[str, float], *, rank: int = 0,
                   world_size: int = 1) -> Batch:
        """Draw the global batch (`batch_size` rows, every process alike) and return rows rank::world_size."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise DataError(f"mixture names unknown sources {sorted(unknown)}; the sources are {self.names}")
        p = np.array([max(0.0, float(weights.get(name, 0.0))) for name in self.names])
        if p.sum() <= 0:
            raise DataError(f"the mixture {weights} gives no source a positive weight")
        choices = self.rng.choice(len(self.names), size=batch_size, p=p / p.sum())
        rows = [self.streams[self.names[c]].take(seq_len + 1) for c in choices]
        mine = list(range(rank, batch_size, world_size))
        tokens = torch.from_numpy(np.stack([rows[i][0] for i in mine]))
        documents = torch.from_numpy(np.stack([rows[i][1] for i in mine]))
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), documents[:, :-1].contiguous(),
                     [self.names[choices[i]] for i in mine])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["streams"]) != self.names:
            raise DataError(f"the checkpoint's data sources {sorted(state['streams'])} are not this recipe's {self.names}")
        self.rng.bit_generator.state = state["rng"]
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)


def epochs_seen(loader: MixtureLoader) -> dict[str, float]:
    """How many passes over each source so far (for the metrics)."""
    return {n: s.epoch + s.position / s.total for n, s in loader.streams.items()}


def validation_batches(shards: list[TokenShard], *, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """Fixed batches from the start of the validation shards (the same every evaluation)."""
    stream = TokenStream(shards)
    windows = min(max_batches * batch_size, max(1, (stream.total - 1) // seq_len))
    rows = [stream.take(seq_len + 1) for _ in range(windows)]
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        tokens = torch.from_numpy(np.stack([r[0] for r in part]))
        documents = torch.from_numpy(np.stack([r[1] for r in part]))
        batches.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                             documents[:, :-1].contiguous(), ["val"] * len(part)))
    return batches


class EpochOrder:
    """Indices 0..size-1 in a seeded random order, one permutation per epoch, resumable by
    (epoch, index): the example order of SFT and DPO."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(self.size)

    def peek(self) -> int:
        """The next index, without taking it (an epoch that is used up rolls over first)."""
        if self.index == self.size:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        return int(self._order[self.index])

    def take(self) -> int:
        i = self.peek()
        self.index += 1
        return i

    @property
    def progress(self) -> float:
        """Epochs so far, fractional."""
        return self.epoch + self.index / self.size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise DataError(f"the data changed since the checkpoint ({self.size} examples now, {state['size']} then)")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()
