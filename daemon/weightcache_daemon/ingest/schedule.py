"""Download order: a rank for every part of a file, for the engine's ``priority``.

The engine (download.py) fetches parts lowest rank first, across all the files of a job. A
part's rank is the lowest rank of the byte ranges it holds: for a safetensors file, the layer
group of the first tensor a reader streaming layer by layer needs from it, so the parts on the
wire are the ones the next layer waits for. Ranks below zero go first: the non-weight files
(config, tokenizer: small, and read by a loader before any weight) at OTHER_FILE_RANK, then every
safetensors header at HEADER_RANK, then layer groups 0, 1, ... .

A header the daemon already holds (it reads every header to build the manifest, and the engine
writes those bytes before fetching anything) needs no early part of its own: its part goes at
the rank of the tensors it holds, so a shard that starts with ``lm_head`` does not put a part of
``lm_head`` on the wire before the embeddings (one part per shard: 240 MiB for 30 shards).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "HEADER_RANK",
    "OTHER_FILE_RANK",
    "group_ranks",
    "other_file_ranks",
    "part_count",
    "part_ranks",
    "safetensors_ranks",
]

OTHER_FILE_RANK = -2
HEADER_RANK = -1


def group_ranks(layers: Sequence[str]) -> list[int]:
    """The rank of each layer group (in manifest order: embed, layers.0, layers.1, ..., rest).

    Groups go in order, except the trailing "rest" group (final norm, lm_head), which goes right
    after layers.0. A forward pass needs it last, but it cannot finish before the download is
    verified anyway, and safetensors stores tensors by name: ``lm_head`` comes first in its
    file, so fetched last it would hold that whole file's hash back until the last byte and add
    a full hash of it between the end of the download and the result. Fetched early, it delays
    layers.1 onwards by its own size, which a download-bound forward pass never notices (each
    layer waits for its bytes either way), and the time to the first layer not at all."""
    ranks = [2 * i for i in range(len(layers))]
    if len(layers) > 2 and layers[-1] == "rest":
        ranks[-1] = 3  # between layers.0 (2) and layers.1 (4)
    return ranks


def part_count(file_size: int, part_size: int) -> int:
    """Parts of a file as the engine cuts it: an empty file still has one (empty) part."""
    if part_size <= 0:
        raise ValueError(f"part size {part_size}: must be positive")
    return max(1, -(-file_size // part_size))


def part_ranks(file_size: int, part_size: int, spans: Sequence[tuple[int, int, int]], default: int) -> list[int]:
    """Per part of the file, the minimum rank of the (start, end, rank) byte spans overlapping it;
    ``default`` for a part that overlaps none. Empty spans overlap nothing."""
    n = part_count(file_size, part_size)
    ranks: list[int | None] = [None] * n
    for start, end, rank in spans:
        if not 0 <= start <= end <= file_size:
            raise ValueError(f"span [{start}, {end}) of rank {rank}: not inside the {file_size}-byte file")
        for i in range(start // part_size, -(-end // part_size)):
            r = ranks[i]
            ranks[i] = rank if r is None else min(r, rank)
    return [default if r is None else r for r in ranks]


def safetensors_ranks(
    file_size: int,
    part_size: int,
    data_offset: int,
    tensors: Sequence[tuple[int, int, int]],
    default: int,
    header_written: bool = False,
) -> list[int]:
    """Ranks for a safetensors file whose data section starts at ``data_offset`` (8 + header
    length): the header at HEADER_RANK, each tensor's (begin, end) at its rank. Tensor offsets
    are absolute (from the start of the file, as ``TensorInfo.offset`` gives them), not relative
    to the data section as in the header's ``data_offsets``.

    ``header_written``: the header's bytes are on disk before the download starts, so its span
    takes the rank of the tensor right after it (the file's first), not HEADER_RANK. The part is
    still fetched (the file's hash needs it), but with its tensors, not ahead of every layer."""
    header_rank = HEADER_RANK
    if header_written:
        header_rank = min(tensors, key=lambda t: t[0])[2] if tensors else default
    return part_ranks(file_size, part_size, [(0, data_offset, header_rank), *tensors], default)


def other_file_ranks(file_size: int, part_size: int) -> list[int]:
    """Ranks for a file that is not safetensors: before every header and weight."""
    return [OTHER_FILE_RANK] * part_count(file_size, part_size)
