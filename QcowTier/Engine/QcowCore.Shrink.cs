using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Shrinking (qemu-img resize --shrink), with QEMU's semantics: the clusters past the new end are
/// discarded completely (their L2 entries become 0, not zero-flagged), the L2 tables past the new L1
/// size are freed and their L1 entries zeroed while the header's l1_size is kept, refcount blocks that
/// then count nothing are dropped, the free tail of the file is truncated, and the size is written last.
/// Crash order: L2 tables, L1 entries, then decrements (the ordinary flush order), then the size: a cut
/// anywhere leaves either the old size with a zeroed tail or the new size, with at worst leaked clusters.
/// </summary>
internal sealed partial class QcowCore
{
    private void Shrink(long newSize)
    {
        lock (_lock)
        {
            if (Header.NbSnapshots != 0)
            {
                throw new NotSupportedException($"{Name ?? "image"}: Can't resize an image which has snapshots");
            }
            // New I/O past the new end is refused from here on; what is in flight lands first.
            Volatile.Write(ref _size, Math.Min(_size, newSize));
        }
        while (true)
        {
            Task? landing;
            lock (_lock)
            {
                landing = _inflight.Count == 0 ? null : _inflight.Values.First().Task;
                if (landing is null)
                {
                    ShrinkLocked(newSize);
                    return;
                }
            }
            landing.GetAwaiter().GetResult();
        }
    }

    private void ShrinkLocked(long newSize)
    {
        FlushLocked();
        var perTable = 1 << _l2Bits;
        var keepTables = QcowHeader.CeilDiv(newSize, (long)_clusterSize << _l2Bits);
        var firstGone = QcowHeader.CeilDiv(newSize, _clusterSize); // first guest cluster wholly past the end
        MarkDirtyIfLazy();

        // The table holding the new end: full discard of its entries past the end.
        if (keepTables > 0 && firstGone < keepTables * perTable && (_l1[keepTables - 1] & ClusterLayout.L1OffsetMask) != 0)
        {
            var (table, l2Off) = GetL2ForWrite((int)(keepTables - 1));
            var changed = false;
            for (var i = (int)(firstGone & (perTable - 1)); i < perTable; i++)
            {
                var e = Entry(table, i);
                if (e == 0)
                {
                    continue;
                }
                if (Kind(e) is ClusterKind.Normal or ClusterKind.ZeroAllocated or ClusterKind.Compressed)
                {
                    FreeCluster(e);
                }
                SetEntry(table, i, 0);
                changed = true;
            }
            if (changed)
            {
                _l2.MarkDirty(l2Off);
            }
        }

        // Tables wholly past the end: their clusters and the tables themselves are freed, the L1 entries zeroed.
        for (var i = (int)keepTables; i < _l1.Length; i++)
        {
            var off = (long)(_l1[i] & ClusterLayout.L1OffsetMask);
            if (off == 0)
            {
                continue;
            }
            var table = LoadL2(off, i);
            if ((_l1[i] & ClusterLayout.Copied) != 0)
            {
                // Only a table we own exclusively owns its entries' references (a shared one keeps them).
                for (var j = 0; j < perTable; j++)
                {
                    var e = Entry(table, j);
                    if (Kind(e) is ClusterKind.Normal or ClusterKind.ZeroAllocated or ClusterKind.Compressed)
                    {
                        FreeCluster(e);
                    }
                }
            }
            _ = ActiveL2Tables(); // the table stays guarded until the L1 entry dropping it is durable
            _l2.Remove(off);
            _refcounts.QueueFree(off, 1);
            _l1[i] = 0;
            _dirtyL1.Add(i);
            _activeL2Dropped = true;
        }

        // L2 tables, fsync, L1 entries, fsync, decrements (with the freed clusters punched out).
        FlushLocked();

        WriteHeaderU64(QcowHeader.OffsetSize, (ulong)newSize);
        File.Flush();
        Header.Size = newSize;
        Volatile.Write(ref _size, newSize);

        ResizeExternalData(newSize);
        GiveBackTail(_refcounts, File);
        if (_hddRefcounts is not null)
        {
            GiveBackTail(_hddRefcounts, _hdd!);
        }
    }

    /// <summary>Drops refcount blocks that count nothing, then truncates the file after its last used cluster.</summary>
    private void GiveBackTail(RefcountManager refcounts, Storage.ImageStorage file)
    {
        refcounts.DropEmptyBlocks();
        var end = (refcounts.LastUsedCluster() + 1) << _clusterBits;
        if (end > 0 && end < file.Length)
        {
            file.SetLength(end);
            file.Flush();
        }
    }
}
