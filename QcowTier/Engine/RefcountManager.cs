using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// The refcount table, its blocks and the cluster allocator.
/// Ordering rules it serves (all callers hold the image's metadata lock):
/// increments may reach the disk at any time (a crash leaks at worst); decrements are queued
/// and applied only after the L2/L1 writes that dropped the references are durable
/// (<see cref="ApplyPendingFrees"/>), so a freed cluster is never reused while the disk still points at it.
/// </summary>
internal sealed class RefcountManager
{
    private readonly ImageStorage _meta;     // where the table and the blocks live
    private readonly ImageStorage _counted;  // the file whose clusters are counted
    private readonly RefcountManager? _parent; // allocates our metadata clusters, or null when self-hosted
    private readonly Action<long, uint> _commitTable;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _order;
    private readonly int _blockBits; // log2(entries per refcount block)
    private readonly ulong _max;
    private readonly List<long> _table = [];
    private readonly HashSet<long> _blockOffsets = [];
    private readonly HashSet<int> _dirtyTableEntries = [];
    private readonly MetadataCache _blocks;
    private readonly Dictionary<long, long> _pendingFrees = [];
    private long _tableOffset;
    private uint _tableClusters;
    private int _diskEntries;
    private long _freeHint;

    /// <summary>The refcounts of a qcow2 file, kept in that file and located by its header.</summary>
    public RefcountManager(ImageStorage file, QcowHeader header, int cacheBlocks)
        : this(file, file, null, header.ClusterBits, header.RefcountOrder, header.RefcountTableOffset, header.RefcountTableClusters, cacheBlocks,
               (off, clusters) => CommitHeaderTable(file, header, off, clusters))
    {
    }

    /// <summary>
    /// Refcounts of <paramref name="counted"/> whose table and blocks live in <paramref name="meta"/>,
    /// allocated by <paramref name="parent"/> (the tiered layout's HDD data file).
    /// </summary>
    public RefcountManager(ImageStorage meta, ImageStorage counted, RefcountManager? parent, int clusterBits, int order,
        long tableOffset, uint tableClusters, int cacheBlocks, Action<long, uint> commitTable)
    {
        _meta = meta;
        _counted = counted;
        _parent = parent;
        _commitTable = commitTable;
        _clusterBits = clusterBits;
        _clusterSize = 1 << clusterBits;
        _order = order;
        _blockBits = _clusterBits + 3 - _order;
        _max = RefcountBlock.MaxValue(_order);
        _blocks = new MetadataCache(cacheBlocks, (off, data) =>
        {
            BeforeMetadataWrite?.Invoke(off, data.Length, false);
            _meta.Write(off, data);
        });
        _tableOffset = tableOffset;
        _tableClusters = tableClusters;
        LoadTable();
    }

    private static void CommitHeaderTable(ImageStorage file, QcowHeader header, long offset, uint clusters)
    {
        Span<byte> hdr = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(hdr, (ulong)offset);
        BinaryPrimitives.WriteUInt32BigEndian(hdr[8..], clusters);
        // One 12-byte write inside the first sector: the switch to the new table is atomic.
        file.Write(QcowHeader.OffsetRefcountTableOffset, hdr);
        header.RefcountTableOffset = offset;
        header.RefcountTableClusters = clusters;
    }

    /// <summary>Called before a block (isTable false) or the table (true) is written: the engine's overlap check.</summary>
    public Action<long, long, bool>? BeforeMetadataWrite { get; set; }

    /// <summary>Called with (offset, field, message) when the refcount structures are found damaged: the engine marks the image corrupt and throws.</summary>
    public Action<long, string, string>? Corruption { get; set; }

    /// <summary>Whether a refcount block lives at this offset of the metadata file.</summary>
    public bool IsBlock(long offset) => _blockOffsets.Contains(offset);

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void Corrupt(long offset, string field, string message)
    {
        Corruption?.Invoke(offset, field, message);
        ThrowHelper.Corrupt(Name, offset, field, message);
    }

    public long EntriesPerBlock => 1L << _blockBits;

    public bool HasPendingFrees => _pendingFrees.Count > 0;

    public bool HasDirty => _dirtyTableEntries.Count > 0 || _blocks.HasDirty || _table.Count > _diskEntries;

    public bool HasDirtyTable => _dirtyTableEntries.Count > 0 || _table.Count > _diskEntries;

    public long TableOffset => _tableOffset;

    public uint TableClusters => _tableClusters;

    private string? Name => _counted.Name;

    private void LoadTable()
    {
        _diskEntries = (int)((long)_tableClusters * _clusterSize / 8);
        var raw = new byte[(long)_tableClusters * _clusterSize];
        _meta.Read(_tableOffset, raw);
        _table.Clear();
        _blockOffsets.Clear();
        for (var i = 0; i < _diskEntries; i++)
        {
            var e = (long)BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            _table.Add(e);
            if (e != 0)
            {
                _blockOffsets.Add(e);
            }
        }
        _freeHint = 0;
    }

    private byte[]? GetBlock(long blockIndex)
    {
        if (blockIndex < _table.Count)
        {
            var off = _table[(int)blockIndex];
            if (off != 0)
            {
                return LoadBlock(off, blockIndex);
            }
        }
        return null;
    }

    private byte[] LoadBlock(long off, long blockIndex)
    {
        var cached = _blocks.TryGet(off);
        if (cached is not null)
        {
            return cached;
        }
        if ((off & (_clusterSize - 1)) != 0 || off < 0)
        {
            Corrupt(_tableOffset + blockIndex * 8, "refcount table entry", $"refcount block offset 0x{off:x} (refcount table index {blockIndex}) is not aligned to the cluster size");
        }
        if (off > _meta.Length - _clusterSize)
        {
            Corrupt(_tableOffset + blockIndex * 8, "refcount table entry", $"refcount block offset 0x{off:x} (refcount table index {blockIndex}) lies beyond the end of the file");
        }
        var data = new byte[_clusterSize];
        _meta.Read(off, data);
        _blocks.Add(off, data, dirty: false);
        return data;
    }

    /// <summary>Adds an empty block for <paramref name="blockIndex"/> at host offset <paramref name="off"/>.</summary>
    private byte[] AddBlock(long blockIndex, long off)
    {
        if (blockIndex == 0 && _parent is null)
        {
            Corrupt(_tableOffset, "refcount table entry", "refcount table entry 0 is empty: the header cluster has no refcount block");
        }
        if ((blockIndex + 1) * 8 > QcowHeader.MaxRefcountTableBytes)
        {
            throw new QcowException($"{Name ?? "image"}: the file would outgrow the largest refcount table qcow2 allows");
        }
        var data = new byte[_clusterSize];
        _blocks.Add(off, data, dirty: true);
        while (_table.Count <= blockIndex)
        {
            _table.Add(0);
        }
        _table[(int)blockIndex] = off;
        _blockOffsets.Add(off);
        _dirtyTableEntries.Add((int)blockIndex);
        return data;
    }


    /// <summary>The largest refcount the image's refcount width can hold.</summary>
    public ulong MaxRefcount => _max;

    public ulong Get(long cluster)
    {
        var block = GetBlock(cluster >> _blockBits);
        return block is null ? 0 : RefcountBlock.Get(block, (int)(cluster & (EntriesPerBlock - 1)), _order);
    }

    public void Update(long cluster, long delta)
    {
        var blockIndex = cluster >> _blockBits;
        var block = GetBlock(blockIndex);
        if (block is null)
        {
            Corrupt(-1, "refcount", $"cluster 0x{cluster << _clusterBits:x} has no refcount block");
        }
        var idx = (int)(cluster & (EntriesPerBlock - 1));
        var cur = RefcountBlock.Get(block, idx, _order);
        ulong next;
        if (delta >= 0)
        {
            if ((ulong)delta > _max - cur)
            {
                throw new QcowException($"{Name ?? "image"}: refcount of cluster 0x{cluster << _clusterBits:x} would exceed the {1 << _order}-bit maximum {_max}");
            }
            next = cur + (ulong)delta;
        }
        else
        {
            if ((ulong)(-delta) > cur)
            {
                Corrupt(_table[(int)blockIndex] + idx, "refcount", $"refcount of cluster 0x{cluster << _clusterBits:x} would drop below zero");
            }
            next = cur - (ulong)(-delta);
        }
        RefcountBlock.Set(block, idx, _order, next);
        _blocks.MarkDirty(_table[(int)blockIndex]);
        if (next == 0 && cluster < _freeHint)
        {
            _freeHint = cluster;
        }
    }

    /// <summary>Allocates <paramref name="count"/> contiguous clusters with refcount 1.</summary>
    /// <param name="count">Clusters wanted.</param>
    /// <param name="fresh">True when the run begins at or past the old end of the file, so it reads as zeroes.</param>
    /// <returns>The host byte offset of the run.</returns>
    /// <remarks>
    /// Ranges without a refcount block read as free. A self-hosted manager places the blocks such a run
    /// needs right after the run (QEMU retries its search instead); each block then counts itself or is
    /// counted by a neighbour, and nothing has to be searched twice.
    /// </remarks>
    public long Allocate(int count, out bool fresh)
    {
        var extra = 0;
        List<long> missing = [];
        while (true)
        {
            var start = FindFree(count + extra);
            missing.Clear();
            for (var b = start >> _blockBits; b <= (start + count + extra - 1) >> _blockBits; b++)
            {
                if (b >= _table.Count || _table[(int)b] == 0)
                {
                    missing.Add(b);
                }
            }
            if (_parent is null && missing.Count > extra)
            {
                extra = missing.Count;
                continue; // room for the blocks too
            }
            var off = start << _clusterBits;
            fresh = off >= _counted.Length;
            var end = start + count;
            foreach (var b in missing)
            {
                AddBlock(b, _parent is null ? (end++) << _clusterBits : _parent.Allocate(1, out _));
            }
            for (var c = start; c < end; c++)
            {
                Update(c, 1);
            }
            if (start == _freeHint)
            {
                _freeHint = end;
            }
            // No ftruncate here: the data write extends the file (the engine pads a partial last cluster),
            // metadata tables extend it when they are written, and until then the range reads as zeroes.
            return off;
        }
    }

    private long FindFree(int count)
    {
        // Cluster 0 of a qcow2 file is its header, whatever a damaged refcount says. The hint must start
        // at that floor too: a hint left below it never advances (the scan never visits it), and every
        // search would then rescan the whole file from the start (quadratic preallocation).
        _freeHint = Math.Max(_freeHint, _parent is null ? 1 : 0);
        var run = 0L;
        var start = 0L;
        var entries = EntriesPerBlock;
        for (var i = _freeHint; ;)
        {
            // A block at a time: one table lookup per block, and a block that does not exist is all free.
            var blockIndex = i >> _blockBits;
            var blockEnd = (blockIndex + 1) << _blockBits;
            var block = GetBlock(blockIndex);
            if (block is null)
            {
                // No block: all free (a cluster waiting for its decrement always has a block).
                if (run == 0)
                {
                    start = i;
                }
                run += blockEnd - i;
                if (run >= count)
                {
                    return start;
                }
                i = blockEnd;
                continue;
            }
            for (var idx = (int)(i & (entries - 1)); idx < entries; idx++, i++)
            {
                var free = RefcountBlock.Get(block, idx, _order) == 0 && (_pendingFrees.Count == 0 || !_pendingFrees.ContainsKey(i));
                if (free)
                {
                    if (run++ == 0)
                    {
                        start = i;
                    }
                    if (run == count)
                    {
                        return start;
                    }
                }
                else
                {
                    run = 0;
                    if (i == _freeHint)
                    {
                        _freeHint = i + 1; // everything below the hint is known to be in use
                    }
                }
            }
        }
    }

    /// <summary>Queues a decrement that must wait until the references to it are gone from the disk.</summary>
    public void QueueFree(long hostOffset, int clusters)
    {
        var c = hostOffset >> _clusterBits;
        for (var i = 0; i < clusters; i++)
        {
            _pendingFrees[c + i] = _pendingFrees.GetValueOrDefault(c + i) + 1;
        }
    }

    /// <summary>Frees clusters that nothing on disk references (an allocation being undone).</summary>
    public void FreeNow(long hostOffset, int clusters)
    {
        var c = hostOffset >> _clusterBits;
        for (var i = 0; i < clusters; i++)
        {
            Update(c + i, -1);
        }
    }

    /// <summary>Applies the queued decrements; returns the clusters that became free (sorted), for space reclaim.</summary>
    public List<long> ApplyPendingFrees()
    {
        var freed = new List<long>();
        if (_pendingFrees.Count == 0)
        {
            return freed;
        }
        foreach (var (cluster, n) in _pendingFrees)
        {
            Update(cluster, -n);
            if (Get(cluster) == 0)
            {
                freed.Add(cluster);
            }
        }
        _pendingFrees.Clear();
        freed.Sort();
        return freed;
    }

    /// <summary>Writes every dirty refcount block (always safe: blocks only ever hold increments or durable decrements).</summary>
    public void WriteBlocks() => _blocks.WriteAllDirty();

    /// <summary>Blocks, then (once they are durable) the table entries pointing at new blocks.</summary>
    public void WriteBack()
    {
        WriteBlocks();
        if (HasDirtyTable)
        {
            _meta.Flush();
            WriteTable();
        }
    }

    /// <summary>
    /// Writes dirty table entries, relocating the table when it has outgrown its clusters. The caller
    /// has made the new blocks durable first: a table entry must never point at an unwritten block.
    /// </summary>
    public void WriteTable()
    {
        if (_table.Count > _diskEntries)
        {
            Relocate();
        }
        if (_dirtyTableEntries.Count > 0)
        {
            Span<byte> e = stackalloc byte[8];
            var sorted = _dirtyTableEntries.ToArray();
            Array.Sort(sorted);
            foreach (var i in sorted)
            {
                BinaryPrimitives.WriteUInt64BigEndian(e, (ulong)_table[i]);
                BeforeMetadataWrite?.Invoke(_tableOffset + (long)i * 8, 8, true);
                _meta.Write(_tableOffset + (long)i * 8, e);
            }
            _dirtyTableEntries.Clear();
        }
    }

    /// <summary>
    /// Moves the refcount table to a larger run of clusters: write the new table and every block,
    /// flush, switch the pointer to it (header or tier extension) in one small write, flush, then free the old one.
    /// </summary>
    private void Relocate()
    {
        var owner = _parent ?? this;
        var clusters = (int)QcowHeader.CeilDiv((long)_table.Count * 8, _clusterSize);
        while (true)
        {
            clusters = Math.Max(clusters, (int)Math.Min(_tableClusters * 2L, QcowHeader.MaxRefcountTableBytes / _clusterSize));
            if ((long)_table.Count * 8 > (long)clusters * _clusterSize)
            {
                throw new QcowException($"{Name ?? "image"}: the file would outgrow the largest refcount table qcow2 allows");
            }
            var off = owner.Allocate(clusters, out _);
            if ((long)_table.Count * 8 <= (long)clusters * _clusterSize)
            {
                var raw = new byte[(long)clusters * _clusterSize];
                for (var i = 0; i < _table.Count; i++)
                {
                    BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), (ulong)_table[i]);
                }
                WriteBlocks();
                if (_parent is not null)
                {
                    _parent.WriteBlocks();
                    _parent.WriteTable();
                }
                BeforeMetadataWrite?.Invoke(off, raw.Length, true);
                _meta.Write(off, raw);
                _meta.Flush();
                var oldOff = _tableOffset;
                var oldClusters = (int)_tableClusters;
                _commitTable(off, (uint)clusters);
                _meta.Flush();
                _tableOffset = off;
                _tableClusters = (uint)clusters;
                _diskEntries = (int)((long)clusters * _clusterSize / 8);
                _dirtyTableEntries.Clear();
                owner.FreeNow(oldOff, oldClusters);
                return;
            }
            // Allocating the table needed more blocks than it has room for: undo and try bigger.
            owner.FreeNow(off, clusters);
            clusters = (int)QcowHeader.CeilDiv((long)_table.Count * 8, _clusterSize) + 1;
        }
    }

    /// <summary>The highest cluster with a non-zero refcount, or -1 (for giving the file's free tail back).</summary>
    public long LastUsedCluster()
    {
        for (var b = _table.Count - 1; b >= 0; b--)
        {
            var block = GetBlock(b);
            if (block is null)
            {
                continue;
            }
            for (var idx = (int)EntriesPerBlock - 1; idx >= 0; idx--)
            {
                if (RefcountBlock.Get(block, idx, _order) != 0)
                {
                    return ((long)b << _blockBits) + idx;
                }
            }
        }
        return -1;
    }

    /// <summary>
    /// Drops the refcount blocks (other than the first) that count nothing but possibly themselves, as
    /// QEMU's shrink does, so the file's tail can be given back. Per block: the table entry is cleared and
    /// made durable first, then the block's own refcount is dropped; a cut in between leaks one cluster.
    /// The caller has flushed: no dirty blocks and no pending frees.
    /// </summary>
    public int DropEmptyBlocks()
    {
        var owner = _parent ?? this;
        var dropped = 0;
        for (var b = _table.Count - 1; b >= 1; b--)
        {
            var off = _table[b];
            if (off == 0)
            {
                continue;
            }
            var block = LoadBlock(off, b);
            var self = _parent is null && (off >> _clusterBits) >> _blockBits == b ? (int)((off >> _clusterBits) & (EntriesPerBlock - 1)) : -1;
            var empty = true;
            for (var idx = 0; idx < EntriesPerBlock && empty; idx++)
            {
                empty = idx == self || RefcountBlock.Get(block, idx, _order) == 0;
            }
            if (!empty || (self >= 0 && RefcountBlock.Get(block, self, _order) != 1))
            {
                continue;
            }
            _table[b] = 0;
            _dirtyTableEntries.Add(b);
            WriteTable();
            _meta.Flush();
            _blocks.Remove(off);
            _blockOffsets.Remove(off);
            if (self < 0)
            {
                owner.FreeNow(off, 1);
                owner.WriteBack();
                _meta.Flush();
            }
            dropped++;
        }
        while (_table.Count > _diskEntries && _table[^1] == 0)
        {
            _table.RemoveAt(_table.Count - 1);
        }
        _freeHint = Math.Min(_freeHint, 1);
        return dropped;
    }

    /// <summary>Every (offset of a refcount block) the table points to, for the checker.</summary>
    public IReadOnlyList<long> Table => _table;
}
