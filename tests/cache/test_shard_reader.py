"""Reading shards (`shard_reader`): single chunks in place from mapped files, checksums, damage named."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cache.test_shards import sample, written_cache


def test_single_chunk_reads_match_and_a_truncated_shard_is_named(tmp_path):
    """The global shuffle reads single chunks through each shard's index, in place from the mapped
    file: the values equal a whole-shard read, and a shard file cut short in place after its index
    was read and it was mapped (found by the check between epochs) names the sample instead of
    decoding a short buffer or touching the mapping past the file's end."""
    from featrecon.cache.shard_reader import ShardDecoder
    from featrecon.cache.shards import shard_key
    from featrecon.errors import CorruptChunk

    path = written_cache(tmp_path / "c.zarr", 8, "zstd:-3")
    dec = ShardDecoder.open(path / "features/b", "features/b")
    outs = [np.empty((2, 5, 5), np.float16) for _ in range(2)]
    dec.read_chunks(1, [2, 0], outs)  # samples 5 and 3, in the order asked
    np.testing.assert_array_equal(outs[0], sample(205, (2, 5, 5), np.float16))
    np.testing.assert_array_equal(outs[1], sample(203, (2, 5, 5), np.float16))
    assert dec._maps[1] is not None  # read in place from the mapped file
    shard = path / "features/b" / shard_key(1, 4)
    shard.write_bytes(shard.read_bytes()[:10])  # cut in place after the decoder read its index and mapped it
    dec.check_mapped()  # as the loader does before each epoch
    with pytest.raises(CorruptChunk, match="sample 5: its chunk lies past the end of the shard file"):
        dec.read_chunks(1, [2], outs[:1])
    assert dec._maps[1] is None  # a file cut in place is not read through its mapping again (SIGBUS)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_mapped_shards_keep_no_file_open_stay_within_the_budget_and_outlive_a_replaced_file(tmp_path, monkeypatch):
    """Single chunks are read in place from shard files mapped once each: the values equal the writer's,
    no file descriptor stays open, the process's mapping budget bounds how many files are mapped (the
    rest are read with pread, to the same values) and `close` gives it back. A shard file replaced whole,
    as featrecon's writers replace one, leaves the mapping on the old file: reads go on giving the old
    values, consistent with the index read from it, instead of mixing the new file with the old index."""
    import os

    from featrecon.cache import shard_reader
    from featrecon.cache.shard_reader import ShardDecoder
    from featrecon.cache.shards import shard_key

    path = written_cache(tmp_path / "c.zarr", 9, "zstd:1")
    other = written_cache(tmp_path / "other.zarr", 9, "zstd:3")
    monkeypatch.setattr(shard_reader._MAPS, "left", 2)
    dec = ShardDecoder.open(path / "features/a", "features/a")
    before = len(os.listdir("/proc/self/fd"))
    out = np.empty((4, 3, 3), np.float16)
    for _ in range(2):
        for i in (0, 4, 8, 1, 7):  # shards 0, 1, 2, 0, 2
            dec.read_chunks(i // 3, [i % 3], [out])
            np.testing.assert_array_equal(out, sample(100 + i, (4, 3, 3), np.float16))
    assert len(os.listdir("/proc/self/fd")) == before + len(dec._fds)  # only pread's kept files
    assert [k for k, m in sorted(dec._maps.items()) if m is not None] == [0, 1] and shard_reader._MAPS.left == 0
    key = shard_key(1, 4)
    replacement = tmp_path / "new"
    replacement.write_bytes((other / "features/a" / shard_key(2, 4)).read_bytes())  # samples 6-8, zstd:3
    os.replace(replacement, path / "features/a" / key)
    dec.read_chunks(1, [1], [out])
    np.testing.assert_array_equal(out, sample(104, (4, 3, 3), np.float16))  # the old file's sample 4
    dec.close()
    assert shard_reader._MAPS.left == 2 and not dec._maps
    fresh = ShardDecoder.open(path / "features/a", "features/a")  # a new reader sees the new file
    fresh.read_chunks(1, [1], [out])
    np.testing.assert_array_equal(out, sample(107, (4, 3, 3), np.float16))
    fresh.close()


def test_a_chunk_is_checked_after_it_is_decompressed_and_damage_is_named_either_way():
    """The crc32c is checked after the decompression (on bytes then in the CPU's cache): a frame that
    decodes but fails its checksum, and one the codec rejects whose checksum fails too, are both a
    checksum mismatch; a frame with a sound checksum that the codec rejects cannot be decoded."""
    import numcodecs
    from google_crc32c import value as crc32c  # zarr's own, independent of ours

    from featrecon.cache.shard_reader import ShardDecoder
    from featrecon.cache.shards import ShardLayout
    from featrecon.errors import CorruptChunk

    codec = numcodecs.Zstd(level=1)
    dec = ShardDecoder(lambda key: None, "features/b", ShardLayout((4, 2, 5, 5), np.dtype(np.float16), 4, codec, True))
    x = sample(3, (2, 5, 5), np.float16)

    def stored(frame: bytes, crc: int | None = None) -> np.ndarray:
        return np.frombuffer(frame + (crc32c(frame) if crc is None else crc).to_bytes(4, "little"), np.uint8)

    frame = codec.encode(x)
    out = np.zeros((2, 5, 5), np.float16)
    dec._decode_bytes(stored(frame), out, 3)
    np.testing.assert_array_equal(out, x)
    with pytest.raises(CorruptChunk, match="sample 3: checksum mismatch"):
        dec._decode_bytes(stored(frame, crc32c(frame) ^ 1), out, 3)
    garbage = bytes(range(40))
    with pytest.raises(CorruptChunk, match="sample 3: checksum mismatch"):
        dec._decode_bytes(stored(garbage, crc32c(garbage) ^ 1), out, 3)
    with pytest.raises(CorruptChunk, match="sample 3: cannot be decoded"):
        dec._decode_bytes(stored(garbage), out, 3)
    with pytest.raises(CorruptChunk, match="sample 3: checksum mismatch"):
        dec._decode_bytes(np.zeros(3, np.uint8), out, 3)


@pytest.mark.parametrize("level", [-3, 1, 3])
def test_zstd_chunks_decode_into_the_slot_as_numcodecs_decodes_them_and_a_wrong_frame_is_named(level):
    """zstd chunks are decompressed by python-zstandard straight into the batch slot (numcodecs' own
    decode holds the GIL for its buffer checks): the values equal numcodecs', for frames numcodecs
    wrote; a frame that decodes to more or fewer bytes than the sample, or not at all, names the
    sample instead of leaving a part-filled slot."""
    import numcodecs

    from featrecon.cache.shard_reader import ShardDecoder
    from featrecon.cache.shards import ShardLayout
    from featrecon.errors import CorruptChunk

    codec = numcodecs.Zstd(level=level)
    layout = ShardLayout((4, 2, 5, 5), np.dtype(np.float16), 4, codec, checksum=False)
    dec = ShardDecoder(lambda key: None, "features/b", layout)
    x = sample(3, (2, 5, 5), np.float16)
    frame = np.frombuffer(codec.encode(x), np.uint8)
    out = np.full((2, 5, 5), 7, np.float16)
    dec._decode_bytes(frame, out, 3)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(out, np.frombuffer(codec.decode(frame), np.float16).reshape(2, 5, 5))
    for wrong in (np.frombuffer(codec.encode(x[:1]), np.uint8), np.frombuffer(codec.encode(np.stack([x, x])), np.uint8),
                  frame[: len(frame) // 2], np.zeros(16, np.uint8)):
        with pytest.raises(CorruptChunk, match="sample 3: cannot be decoded"):
            dec._decode_bytes(wrong, out, 3)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_single_chunk_reads_keep_a_bounded_number_of_shard_files_open_until_close(tmp_path):
    """Single-chunk reads that cannot map their shard files keep the first `keep_open` files open (an
    open and close per chunk costs the reading threads); past that bound they open and close each
    time; `close` closes them all, and reads after it still give the right values."""
    import os

    from featrecon.cache.shard_reader import ShardDecoder

    path = written_cache(tmp_path / "c.zarr", 9, "zstd:1")

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    dec = ShardDecoder.open(path / "features/a", "features/a")
    dec.keep_open, dec.map_files = 2, False
    before = open_files()
    out = np.empty((4, 3, 3), np.float16)
    for _ in range(2):
        for i in (0, 4, 8, 1, 7):  # shards 0, 1, 2, 0, 2
            dec.read_chunks(i // 3, [i % 3], [out])
            np.testing.assert_array_equal(out, sample(100 + i, (4, 3, 3), np.float16))
            assert open_files() - before <= 2
        assert sorted(dec._fds) == [0, 1]
        dec.close()
        assert open_files() == before and not dec._fds
