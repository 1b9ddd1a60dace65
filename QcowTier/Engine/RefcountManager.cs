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
    private readonly ImageStorage _file;
    private readonly QcowHeader _header;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _order;
    private readonly int _blockBits; // log2(entries per refcount block)
    private readonly ulong _max;
    private readonly List<long> _table = [];
    private readonly HashSet<int> _dirtyTableEntries = [];
    private readonly MetadataCache _blocks;
    private readonly Dictionary<long, long> _pendingFrees = [];
    private long _tableOffset;
    private int _diskEntries;
    private long _freeHint;

    public RefcountManager(ImageStorage file, QcowHeader header, int cacheBlocks)
    {
        _file = file;
        _header = header;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _order = header.RefcountOrder;
        _blockBits = _clusterBits + 3 - _order;
        _max = RefcountBlock.MaxValue(_order);
        _blocks = new MetadataCache(cacheBlocks, (off, data) => _file.Write(off, data));
        LoadTable();
    }

    public long EntriesPerBlock => 1L << _blockBits;

    public int TableEntries => _table.Count;

    public bool HasPendingFrees => _pendingFrees.Count > 0;

    public bool HasDirty => _dirtyTableEntries.Count > 0 || _blocks.HasDirty || _table.Count > _diskEntries;

    private string? Name => _file.Name;

    private void LoadTable()
    {
        _tableOffset = _header.RefcountTableOffset;
        _diskEntries = (int)((long)_header.RefcountTableClusters * _clusterSize / 8);
        var raw = new byte[(long)_header.RefcountTableClusters * _clusterSize];
        _file.Read(_tableOffset, raw);
        var last = 0;
        _table.Clear();
        for (var i = 0; i < _diskEntries; i++)
        {
            var e = (long)BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            _table.Add(e);
            if (e != 0)
            {
                last = i + 1;
            }
        }
        _ = last;
        _freeHint = 0;
    }

    /// <summary>Drops every cached block and re-reads the table (after an external repair).</summary>
    public void Reload()
    {
        _blocks.Clear();
        _dirtyTableEntries.Clear();
        _pendingFrees.Clear();
        LoadTable();
    }

    private byte[]? GetBlock(long blockIndex, bool create)
    {
        if (blockIndex < _table.Count)
        {
            var off = _table[(int)blockIndex];
            if (off != 0)
            {
                return LoadBlock(off, blockIndex);
            }
        }
        if (!create)
        {
            return null;
        }
        return CreateBlock(blockIndex);
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
            ThrowHelper.Corrupt(Name, _tableOffset + blockIndex * 8, "refcount table entry", $"refcount block offset 0x{off:x} (refcount table index {blockIndex}) is not aligned to the cluster size");
        }
        if (off > _file.Length - _clusterSize)
        {
            ThrowHelper.Corrupt(Name, _tableOffset + blockIndex * 8, "refcount table entry", $"refcount block offset 0x{off:x} (refcount table index {blockIndex}) lies beyond the end of the file");
        }
        var data = new byte[_clusterSize];
        _file.Read(off, data);
        _blocks.Add(off, data, dirty: false);
        return data;
    }

    /// <summary>
    /// A block for a range nobody has allocated in yet lives at the first cluster of its own range:
    /// that cluster is free by definition, and the block describes itself.
    /// </summary>
    private byte[] CreateBlock(long blockIndex)
    {
        var cluster = blockIndex << _blockBits;
        if (cluster == 0)
        {
            ThrowHelper.Corrupt(Name, _tableOffset, "refcount table entry", "refcount table entry 0 is empty: the header cluster has no refcount block");
        }
        if ((cluster << _clusterBits) / 8 > QcowHeader.MaxRefcountTableBytes * EntriesPerBlock)
        {
            throw new QcowException($"{Name ?? "image"}: the image would outgrow the largest refcount table qcow2 allows");
        }
        var off = cluster << _clusterBits;
        var data = new byte[_clusterSize];
        RefcountBlock.Set(data, 0, _order, 1);
        EnsureFileCovers(off + _clusterSize);
        _blocks.Add(off, data, dirty: true);
        while (_table.Count <= blockIndex)
        {
            _table.Add(0);
        }
        _table[(int)blockIndex] = off;
        _dirtyTableEntries.Add((int)blockIndex);
        return data;
    }

    private void EnsureFileCovers(long end)
    {
        if (_file.Length < end)
        {
            // Extending under the metadata lock, before any data is written to the new clusters,
            // means the file only ever grows and a new cluster reads as zeroes until written.
            _file.SetLength(end);
        }
    }

    public ulong Get(long cluster)
    {
        var block = GetBlock(cluster >> _blockBits, create: false);
        return block is null ? 0 : RefcountBlock.Get(block, (int)(cluster & (EntriesPerBlock - 1)), _order);
    }

    public void Update(long cluster, long delta)
    {
        var blockIndex = cluster >> _blockBits;
        var block = GetBlock(blockIndex, create: delta > 0)
            ?? ThrowHelper.Corrupt<byte[]>(Name, -1, "refcount", $"cluster 0x{cluster << _clusterBits:x} is freed but has no refcount block");
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
                ThrowHelper.Corrupt(Name, _table[(int)blockIndex] + idx, "refcount", $"refcount of cluster 0x{cluster << _clusterBits:x} would drop below zero");
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
    public long Allocate(int count, out bool fresh)
    {
        while (true)
        {
            var start = FindFree(count);
            var created = false;
            for (var b = start >> _blockBits; b <= (start + count - 1) >> _blockBits; b++)
            {
                if (GetBlock(b, create: false) is null)
                {
                    CreateBlock(b);
                    created = true;
                }
            }
            if (created)
            {
                continue; // the new block took a cluster, perhaps inside the run: search again
            }
            var off = start << _clusterBits;
            fresh = off >= _file.Length;
            for (var i = 0L; i < count; i++)
            {
                Update(start + i, 1);
            }
            if (start == _freeHint)
            {
                _freeHint = start + count;
            }
            EnsureFileCovers(off + ((long)count << _clusterBits));
            return off;
        }
    }

    private long FindFree(int count)
    {
        var run = 0;
        var start = 0L;
        for (var i = _freeHint; ; i++)
        {
            if (Get(i) == 0 && !_pendingFrees.ContainsKey(i))
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

    public void ApplyPendingFrees()
    {
        if (_pendingFrees.Count == 0)
        {
            return;
        }
        foreach (var (cluster, n) in _pendingFrees)
        {
            Update(cluster, -n);
        }
        _pendingFrees.Clear();
    }

    /// <summary>Writes every dirty refcount block and table entry, relocating the table when it has outgrown its clusters.</summary>
    public void WriteBack()
    {
        if (_table.Count > _diskEntries)
        {
            Relocate();
        }
        _blocks.WriteAllDirty();
        if (_dirtyTableEntries.Count > 0)
        {
            Span<byte> e = stackalloc byte[8];
            var sorted = _dirtyTableEntries.ToArray();
            Array.Sort(sorted);
            foreach (var i in sorted)
            {
                BinaryPrimitives.WriteUInt64BigEndian(e, (ulong)_table[i]);
                _file.Write(_tableOffset + (long)i * 8, e);
            }
            _dirtyTableEntries.Clear();
        }
    }

    /// <summary>
    /// Moves the refcount table to a larger run of clusters: write the new table, flush, point the
    /// header at it (one 12-byte write inside the first sector), flush, then free the old one.
    /// </summary>
    private void Relocate()
    {
        var clusters = (int)QcowHeader.CeilDiv((long)_table.Count * 8, _clusterSize);
        while (true)
        {
            clusters = Math.Max(clusters, (int)_header.RefcountTableClusters * 2);
            if ((long)clusters * _clusterSize > QcowHeader.MaxRefcountTableBytes)
            {
                clusters = (int)(QcowHeader.MaxRefcountTableBytes / _clusterSize);
                if ((long)_table.Count * 8 > (long)clusters * _clusterSize)
                {
                    throw new QcowException($"{Name ?? "image"}: the image would outgrow the largest refcount table qcow2 allows");
                }
            }
            var off = Allocate(clusters, out _);
            if ((long)_table.Count * 8 <= (long)clusters * _clusterSize)
            {
                var raw = new byte[(long)clusters * _clusterSize];
                for (var i = 0; i < _table.Count; i++)
                {
                    BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), (ulong)_table[i]);
                }
                _blocks.WriteAllDirty();
                _file.Write(off, raw);
                _file.Flush();
                Span<byte> hdr = stackalloc byte[12];
                BinaryPrimitives.WriteUInt64BigEndian(hdr, (ulong)off);
                BinaryPrimitives.WriteUInt32BigEndian(hdr[8..], (uint)clusters);
                _file.Write(QcowHeader.OffsetRefcountTableOffset, hdr);
                _file.Flush();
                var oldOff = _tableOffset;
                var oldClusters = (int)_header.RefcountTableClusters;
                _header.RefcountTableOffset = off;
                _header.RefcountTableClusters = (uint)clusters;
                _tableOffset = off;
                _diskEntries = (int)((long)clusters * _clusterSize / 8);
                _dirtyTableEntries.Clear();
                FreeNow(oldOff, oldClusters);
                return;
            }
            // Allocating the table needed more blocks than it has room for: undo and try bigger.
            FreeNow(off, clusters);
            clusters = (int)QcowHeader.CeilDiv((long)_table.Count * 8, _clusterSize) + 1;
        }
    }

    /// <summary>Every (offset of a refcount block) the table points to, for the checker.</summary>
    public IReadOnlyList<long> Table => _table;
}
