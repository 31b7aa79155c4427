"""What one forward step runs: the flattened new tokens of every row, the KV cache cells their
K/V go to, which logits are wanted, and each row's packs. Built once per step, read by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skillpack_kernels.row_packs import RowPacks


@dataclass
class SeqChunk:
    """One sequence's part of a step: `tokens` at positions start_pos, start_pos+1, ..."""

    tokens: list[int]
    start_pos: int
    pages: list[int]  # the sequence's block table; covers start_pos + len(tokens) tokens
    logits_at: list[int]  # chunk offsets whose logits are wanted
    packs: list[tuple[int, float]]  # (pack slot, weight); empty = the base model


@dataclass
class StepPacks:
    """Per-row pack weights for one step; absent (None) when no row uses a pack."""

    mix: torch.Tensor  # (N, num_pack_slots) float32: weight of pack slot s in row i (0 = unused)
    row_packs: RowPacks  # the kernels' per-row packs for the same N rows
    active_slots: set[int]
    row_pack_lists: list[list[tuple[int, float]]] = field(default_factory=list)  # what row_packs was built from
    _by_loaded: dict = field(default_factory=dict, repr=False)

    def row_packs_for(self, loaded: set[int]) -> RowPacks:
        """The per-row packs restricted to the pack slots that hold a delta for one linear.

        A budget build may drop a module from a pack; rows of that pack then get no delta
        on that linear. Built once per step for each distinct set of slots, shared by every
        linear with that set (usually all of them).
        """
        if self.active_slots <= loaded:
            return self.row_packs
        key = frozenset(self.active_slots & loaded)
        if key not in self._by_loaded:
            lists = [[(s, w) for s, w in packs if s in key] for packs in self.row_pack_lists]
            self._by_loaded[key] = RowPacks.build(lists, self.mix.device)
        return self._by_loaded[key]

    def rows_of(self, slot: int, rows: torch.Tensor | None = None):
        """(row indices, weights) of the rows (optionally a subset) that use `slot`."""
        col = self.mix[:, slot] if rows is None else self.mix[rows, slot]
        idx = col.nonzero().squeeze(1)
        return idx, col[idx]


@dataclass
class SeqSpan:
    """One sequence's part of the step, for attention: its rows, where they sit, its pages."""

    first: int  # first of its rows among the step's N tokens
    rows: int  # its new tokens this step (1 for a decode row)
    start: int  # position of its first new token
    pages: torch.Tensor  # (P_b,) long, on the device: its block table, exactly as long as it is
    first_page: int | None = None  # when its pages are one ascending run: the first (read in place)

    @property
    def context_len(self) -> int:
        """Tokens cached after this step."""
        return self.start + self.rows


@dataclass
class StepBatch:
    token_ids: torch.Tensor  # (N,) long: every new token of the step, row after row
    positions: torch.Tensor  # (N,) long
    cell_mapping: torch.Tensor  # (N,) long: the KV cache cell each new token writes (page * page_size + offset)
    seq_index: torch.Tensor  # (N,) long: which sequence of the step a token belongs to
    block_tables: torch.Tensor  # (B, P) long: page ids, padded with page 0
    context_lens: torch.Tensor  # (B,) long: cached tokens after this step
    logits_rows: torch.Tensor  # (M,) long: rows of the N tokens whose logits are returned
    packs: StepPacks | None
    spans: list[SeqSpan] = field(default_factory=list)  # per sequence, in step order

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())


def build_step(chunks: list[SeqChunk], page_size: int, num_pack_slots: int, device,
               previous: StepPacks | None = None) -> StepBatch:
    """Lay out a step's sequences as flat token rows plus padded attention metadata.
    `previous`: the last step's packs, taken as they are when every row uses the same packs
    again (decode steps of an unchanged batch), with what the linears kept for that step."""
    if not chunks:
        raise ValueError("a step needs at least one sequence.")
    tokens, positions, cells, seq_index, logits_rows, row_packs = [], [], [], [], [], []
    max_pages = max(len(c.pages) for c in chunks)
    tables = torch.zeros(len(chunks), max_pages, dtype=torch.long)
    ctx, spans = [], []  # spans: (first row, rows, packs) per sequence
    for b, c in enumerate(chunks):
        n = len(c.tokens)
        end = c.start_pos + n
        if n == 0 or len(c.pages) * page_size < end:
            raise ValueError(f"sequence {b}: {n} tokens ending at {end} do not fit its {len(c.pages)} pages.")
        base_row = len(tokens)
        pos = list(range(c.start_pos, end))
        tokens.extend(c.tokens)
        positions.extend(pos)
        cells.extend(c.pages[p // page_size] * page_size + p % page_size for p in pos)
        seq_index.extend([b] * n)
        logits_rows.extend(base_row + j for j in c.logits_at)
        row_packs.extend([c.packs] * n)
        spans.append((base_row, n, c.packs))
        # only the pages the sequence fills: attention reads no page past its end
        tables[b, : -(-end // page_size)] = torch.tensor(c.pages[: -(-end // page_size)], dtype=torch.long)
        ctx.append(end)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.long).to(device)

    packs = None
    if previous is not None and previous.row_pack_lists == row_packs and previous.mix.shape[1] == num_pack_slots:
        packs = previous
    elif any(row_packs):
        mix = torch.zeros(len(tokens), num_pack_slots, dtype=torch.float32)
        for first, n, packs_of_seq in spans:
            for slot, weight in packs_of_seq:
                mix[first : first + n, slot] += weight
        packs = StepPacks(
            mix=mix.to(device),
            row_packs=RowPacks.build(row_packs, device),
            active_slots={s for c in chunks for s, _ in c.packs},
            row_pack_lists=row_packs,
        )
    tables = tables.to(device)
    seq_spans = []
    for b, ((first, n, _), c) in enumerate(zip(spans, chunks)):
        used = c.pages[: -(-(c.start_pos + n) // page_size)]
        run = all(q == p + 1 for p, q in zip(used, used[1:]))
        seq_spans.append(SeqSpan(first, n, c.start_pos, tables[b, : len(used)], used[0] if run else None))
    return StepBatch(
        token_ids=as_tensor(tokens), positions=as_tensor(positions), cell_mapping=as_tensor(cells),
        seq_index=as_tensor(seq_index), block_tables=tables, context_lens=as_tensor(ctx),
        logits_rows=as_tensor(logits_rows), packs=packs, spans=seq_spans,
    )
