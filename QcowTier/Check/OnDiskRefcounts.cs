using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>
/// The refcounts the image claims: its refcount table and blocks as they are on disk, read the way
/// QEMU's qcow2_get_refcount reads them (offset bits masked, an unaligned block unreadable), and
/// written back for repairs. Keeps a bounded number of blocks in memory.
/// </summary>
internal sealed class OnDiskRefcounts
{
    /// <summary>Refcount table entry bits 9-63: the block's offset (REFT_OFFSET_MASK).</summary>
    public const ulong OffsetMask = 0xfffffffffffffe00UL;
    /// <summary>Refcount table entry bits 0-8 must be zero (REFT_RESERVED_MASK).</summary>
    public const ulong ReservedMask = 0x1ffUL;

    private const int MaxCachedBlocks = 256;

    private readonly ImageStorage _file;
    private readonly ulong[] _table;
    private readonly int _clusterSize;
    private readonly int _order;
    private readonly int _blockBits;
    private readonly Dictionary<ulong, byte[]> _cache = [];
    private readonly HashSet<ulong> _dirty = [];
    private ulong _lastOffset = ulong.MaxValue;
    private byte[]? _lastBlock;

    private OnDiskRefcounts(ImageStorage file, long tableOffset, int clusterBits, int refcountOrder, ulong[] table)
    {
        _file = file;
        _table = table;
        _clusterSize = 1 << clusterBits;
        _order = refcountOrder;
        _blockBits = clusterBits + 3 - refcountOrder;
        TableOffset = tableOffset;
    }

    /// <summary>
    /// Reads a refcount table of <paramref name="clusters"/> clusters at <paramref name="tableOffset"/> in
    /// <paramref name="file"/>, where its blocks live too (the primary file, for either tier's table).
    /// </summary>
    public static OnDiskRefcounts Load(ImageStorage file, long tableOffset, uint clusters, int clusterBits, int refcountOrder)
    {
        var bytes = (long)clusters << clusterBits;
        if (bytes > QcowHeader.MaxRefcountTableBytes)
        {
            ThrowHelper.Corrupt(file.Name, tableOffset, "refcount table", $"refcount table of {clusters} clusters is larger than {QcowHeader.MaxRefcountTableBytes} bytes");
        }
        var raw = new byte[bytes];
        CheckIo.ReadZeroPadded(file, (ulong)tableOffset, raw);
        var table = new ulong[bytes / 8];
        for (var i = 0; i < table.Length; i++)
        {
            table[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
        }
        return new OnDiskRefcounts(file, tableOffset, clusterBits, refcountOrder, table);
    }

    public long TableOffset { get; }

    public int TableEntries => _table.Length;

    public ulong Entry(int index) => _table[index];

    /// <summary>log2 of the clusters one refcount block describes.</summary>
    public int BlockBits => _blockBits;

    public bool HasDirty => _dirty.Count > 0;

    /// <summary>
    /// The refcount the image records for a cluster. False when the block holding it cannot be read
    /// because its table entry is not cluster aligned or out of reach (QEMU fails such reads with EIO).
    /// </summary>
    public bool TryGet(ulong cluster, out ulong refcount, out int tableIndex, out ulong blockOffset)
    {
        refcount = 0;
        blockOffset = 0;
        var index = cluster >> _blockBits;
        tableIndex = index < (ulong)_table.Length ? (int)index : -1;
        if (tableIndex < 0)
        {
            return true;
        }
        blockOffset = _table[tableIndex] & OffsetMask;
        if (blockOffset == 0)
        {
            return true;
        }
        if ((blockOffset & (ulong)(_clusterSize - 1)) != 0 || blockOffset > long.MaxValue)
        {
            // Unaligned, or beyond any offset a read can reach (QEMU's read fails with EIO).
            return false;
        }
        var block = Block(blockOffset);
        refcount = RefcountBlock.Get(block, (int)(cluster & ((1UL << _blockBits) - 1)), _order);
        return true;
    }

    /// <summary>Changes a refcount in its (existing, readable) block; reaches the disk at <see cref="WriteBack"/>.</summary>
    public void Set(ulong cluster, ulong value)
    {
        var index = (int)(cluster >> _blockBits);
        var blockOffset = _table[index] & OffsetMask;
        var block = Block(blockOffset);
        RefcountBlock.Set(block, (int)(cluster & ((1UL << _blockBits) - 1)), _order, value);
        _dirty.Add(blockOffset);
    }

    /// <summary>Writes every changed block. The caller flushes.</summary>
    public void WriteBack()
    {
        if (_dirty.Count == 0)
        {
            return;
        }
        var offsets = _dirty.ToArray();
        Array.Sort(offsets);
        foreach (var off in offsets)
        {
            _file.Write((long)off, _cache[off]);
        }
        _dirty.Clear();
    }

    private byte[] Block(ulong offset)
    {
        if (offset == _lastOffset && _lastBlock is not null)
        {
            return _lastBlock;
        }
        if (!_cache.TryGetValue(offset, out var block))
        {
            if (_cache.Count >= MaxCachedBlocks)
            {
                // Changed blocks are written before they are forgotten; nothing is flushed here,
                // the caller's flush covers them with the rest of its repairs.
                WriteBack();
                _cache.Clear();
                _lastBlock = null;
            }
            block = new byte[_clusterSize];
            CheckIo.ReadZeroPadded(_file, offset, block);
            _cache.Add(offset, block);
        }
        _lastOffset = offset;
        _lastBlock = block;
        return block;
    }
}

/// <summary>Reads that tolerate offsets anywhere in the 64-bit space, as QEMU's reads past the end of a file do.</summary>
internal static class CheckIo
{
    /// <summary>Fills the buffer from the file; whatever lies past the end of the file reads as zeroes.</summary>
    public static void ReadZeroPadded(ImageStorage file, ulong offset, Span<byte> buffer)
    {
        var length = (ulong)file.Length;
        if (offset >= length)
        {
            buffer.Clear();
            return;
        }
        var avail = (int)Math.Min((ulong)buffer.Length, length - offset);
        file.Read((long)offset, buffer[..avail]);
        buffer[avail..].Clear();
    }
}
