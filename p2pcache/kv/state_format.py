"""Reading and writing llama.cpp's per-sequence KV state (`llama_state_seq_get_data`).

The bytes are: an 8-byte header, then one *section* per KV cache of the model (a plain model
has one; a sliding-window model such as Gemma 3 has two: the full-attention layers, then the
SWA layers). A section is::

    u32 n_stream (1) | u32 cell_count | cell_count x (i32 pos, u32 n_seq_id=1, i32 seq_id)
    u32 v_trans | u32 n_layer
    n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
    v_trans == 0: n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
    v_trans == 1: n_layer x (i32 v_type, u32 el_bytes, u32 n_embd_v, n_embd_v x cell_count elements)

We cut a state into per-token K/V rows (so it can be stored in chunks that many prefixes
share) and assemble a state for any chunk boundary from stored rows. Transposed V stays in
llama.cpp's layout, (n_embd_v, cells, element): a chunk keeps its (n_embd_v, C, element)
block, and a restore writes each layer with one ``np.concatenate(..., out=)`` straight into
the state buffer (de-transposing 2-byte elements instead took ~60 ms of a 2k-token restore).
Parsing checks that the bytes are consumed exactly; anything unexpected raises
`StateFormatError`, and the caller then falls back to plain prefill rather than guess.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from p2pcache.backend.state_buffer import StateBuffer
from p2pcache.errors import StateFormatError  # noqa: F401 - re-exported


@dataclass(frozen=True)
class LayerLayout:
    k_type: int
    k_row: int  # bytes of one token's K row
    v_type: int
    v_row: int  # bytes of one token's V row (n_embd_v * el_bytes when transposed)
    v_el: int  # bytes per V element (used when V is stored transposed)


@dataclass(frozen=True)
class SectionLayout:
    v_trans: bool
    layers: tuple[LayerLayout, ...]

    @property
    def row_bytes(self) -> int:
        """K + V bytes of one token over all layers of this section."""
        return sum(layer.k_row + layer.v_row for layer in self.layers)


@dataclass(frozen=True)
class StateLayout:
    header: bytes
    sections: tuple[SectionLayout, ...]

    @property
    def token_bytes(self) -> int:
        return sum(s.row_bytes for s in self.sections)

    def describe(self) -> list[object]:
        """A msgpack-able description (part of kv_config: a changed layout never restores)."""
        return [
            self.header.hex(),
            [
                [
                    int(s.v_trans),
                    [[ly.k_type, ly.k_row, ly.v_type, ly.v_row, ly.v_el] for ly in s.layers],
                ]
                for s in self.sections
            ],
        ]


@dataclass
class Section:
    """One cache's cells, position-sorted: ``k[l]`` has shape (cells, K row bytes) for layer
    l; ``v[l]`` has shape (cells, V row bytes), or (n_embd_v, cells, element bytes) when the
    section's V is transposed (see `v_cells`)."""

    positions: np.ndarray  # int32, sorted
    k: list[np.ndarray]
    v: list[np.ndarray]


_U32 = struct.Struct("<I")
_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])


def parse_state(
    buf: bytes | memoryview, n_sections: int | None = None
) -> tuple[StateLayout, list[Section]]:
    """Split a sequence state into its layout and per-token rows (views into ``buf``)."""
    mv = memoryview(buf)
    if len(mv) < 8:
        raise StateFormatError("state shorter than its header")
    header = bytes(mv[:8])
    off = 8
    layouts: list[SectionLayout] = []
    sections: list[Section] = []
    try:
        while off < len(mv):
            n_stream, cells = struct.unpack_from("<II", mv, off)
            off += 8
            if n_stream != 1:
                raise StateFormatError(f"{n_stream} streams per cache (expected 1)")
            meta = np.frombuffer(mv, dtype=_CELL, count=cells, offset=off)
            off += cells * _CELL.itemsize
            if cells and (np.any(meta["n_seq"] != 1) or np.any(meta["seq"] != 0)):
                raise StateFormatError("cells with extra metadata or several sequences")
            v_trans, n_layer = struct.unpack_from("<II", mv, off)
            off += 8
            k_rows, k_meta = [], []
            for _ in range(n_layer):
                k_type, k_row = struct.unpack_from("<iQ", mv, off)
                off += 12
                k_rows.append(np.frombuffer(mv, np.uint8, cells * k_row, off).reshape(cells, k_row))
                k_meta.append((k_type, k_row))
                off += cells * k_row
            v_rows, layers = [], []
            for k_type, k_row in k_meta:
                if v_trans:
                    v_type, el, n_embd = struct.unpack_from("<iII", mv, off)
                    off += 12
                    v_rows.append(
                        np.frombuffer(mv, np.uint8, n_embd * cells * el, off).reshape(
                            n_embd, cells, el
                        )
                    )
                    off += n_embd * cells * el
                    layers.append(LayerLayout(k_type, k_row, v_type, n_embd * el, el))
                else:
                    v_type, v_row = struct.unpack_from("<iQ", mv, off)
                    off += 12
                    v_rows.append(
                        np.frombuffer(mv, np.uint8, cells * v_row, off).reshape(cells, v_row)
                    )
                    off += cells * v_row
                    layers.append(LayerLayout(k_type, k_row, v_type, v_row, 0))
            pos = meta["pos"].copy()
            if cells and np.any(np.diff(pos) <= 0):  # we only ever build position-sorted states
                order = np.argsort(pos, kind="stable")
                pos = pos[order]
                k_rows = [r[order] for r in k_rows]
                v_rows = [r[:, order] if v_trans else r[order] for r in v_rows]
            layouts.append(SectionLayout(bool(v_trans), tuple(layers)))
            sections.append(Section(pos, k_rows, v_rows))
    except (struct.error, ValueError) as exc:
        if isinstance(exc, StateFormatError):
            raise
        raise StateFormatError(f"truncated or malformed state: {exc}") from exc
    if off != len(mv):
        raise StateFormatError(f"state has {len(mv) - off} trailing bytes")
    if n_sections is not None and len(sections) != n_sections:
        raise StateFormatError(f"{len(sections)} caches in the state, expected {n_sections}")
    return StateLayout(header, tuple(layouts)), sections


def state_size(layout: StateLayout, cells: list[int]) -> int:
    n = len(layout.header)
    for sec, c in zip(layout.sections, cells, strict=True):
        n += 8 + c * _CELL.itemsize + 8 + len(sec.layers) * 24 + c * sec.row_bytes
    return n


def v_cells(v_trans: bool, v: np.ndarray, a: int, b: int) -> np.ndarray:
    """Cells a..b of a layer's V (rows, or the transposed block)."""
    return v[:, a:b] if v_trans else v[a:b]


def build_state(
    layout: StateLayout,
    positions: list[np.ndarray],
    rows: list[list[tuple[list[np.ndarray], list[np.ndarray]]]],
    out: StateBuffer,
) -> int:
    """Write a state into ``out`` and return its size. ``rows[s][l] = (K parts, V parts)``,
    consecutive runs of cells in position order: K parts of shape (cells_i, K row bytes), V
    parts of shape (cells_i, V row bytes), or (n_embd_v, cells_i, element bytes) when the
    section's V is transposed. Each layer is one concatenation into the buffer."""
    cells = [len(p) for p in positions]
    need = state_size(layout, cells)
    out.ensure(need)
    mv = out.view(need)
    mv[:8] = layout.header
    off = 8
    for sec, pos, sec_rows in zip(layout.sections, positions, rows, strict=True):
        c = len(pos)
        struct.pack_into("<II", mv, off, 1, c)
        off += 8
        meta = np.frombuffer(mv, dtype=_CELL, count=c, offset=off)
        meta["pos"] = pos
        meta["n_seq"] = 1
        meta["seq"] = 0
        off += c * _CELL.itemsize
        struct.pack_into("<II", mv, off, int(sec.v_trans), len(sec.layers))
        off += 8
        for layer, (ks, _) in zip(sec.layers, sec_rows, strict=True):
            struct.pack_into("<iQ", mv, off, layer.k_type, layer.k_row)
            off += 12
            dst = np.frombuffer(mv, np.uint8, c * layer.k_row, off).reshape(c, layer.k_row)
            _concat(ks, dst, 0)
            off += c * layer.k_row
        for layer, (_, vs) in zip(sec.layers, sec_rows, strict=True):
            if sec.v_trans:
                n_embd = layer.v_row // layer.v_el
                struct.pack_into("<iII", mv, off, layer.v_type, layer.v_el, n_embd)
                off += 12
                dst = np.frombuffer(mv, np.uint8, c * layer.v_row, off).reshape(
                    n_embd, c, layer.v_el
                )
                _concat(vs, dst, 1)
            else:
                struct.pack_into("<iQ", mv, off, layer.v_type, layer.v_row)
                off += 12
                dst = np.frombuffer(mv, np.uint8, c * layer.v_row, off).reshape(c, layer.v_row)
                _concat(vs, dst, 0)
            off += c * layer.v_row
    assert off == need
    return need


def _concat(parts: list[np.ndarray], dst: np.ndarray, axis: int) -> None:
    if sum(p.shape[axis] for p in parts) != dst.shape[axis]:
        raise StateFormatError("row parts do not add up to the state's cells")
    if len(parts) == 1:
        dst[:] = parts[0]
    elif parts:
        np.concatenate(parts, axis=axis, out=dst)
