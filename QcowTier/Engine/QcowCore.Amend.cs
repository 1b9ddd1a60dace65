using System.Buffers.Binary;
using System.Numerics;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// qemu-img amend (QEMU's qcow2_amend_options): compat upgrade and downgrade, lazy refcounts on and
/// off, and a new refcount width, in QEMU's order (upgrade, refcount width, lazy refcounts, downgrade)
/// and with its refusals. Every step leaves a consistent image when cut short:
/// <list type="bullet">
/// <item>a downgrade first makes the image clean, expands zero clusters (the content is unchanged at
/// every point: plain zero clusters become unallocated, preallocated ones get zeroes written before
/// their flag is cleared), and only then rewrites the header as version 2;</item>
/// <item>a new refcount width is written as a complete new refcount table and blocks in clusters the
/// old refcounts mark as used, made durable, then switched to with one write inside the first sector
/// (table offset, table size and refcount order together); the old structures are freed last, so a cut
/// leaks clusters at worst.</item>
/// </list>
/// </summary>
internal sealed partial class QcowCore
{
    public void Amend(QcowCompat? compat, bool? lazyRefcounts, int? refcountBits)
    {
        CheckWritable();
        var newVersion = compat is null ? Header.Version : (uint)compat.Value;
        if (lazyRefcounts == true && newVersion < 3)
        {
            throw new ArgumentException("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
        }
        if (refcountBits is { } bits)
        {
            if (bits is < 1 or > 64 || !BitOperations.IsPow2(bits))
            {
                throw new ArgumentException("Refcount width must be a power of two and may not exceed 64 bits");
            }
            if (newVersion < 3 && bits != 16)
            {
                throw new ArgumentException("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
        }
        if (IsTiered && (newVersion != Header.Version || (refcountBits is { } b && b != Header.RefcountBits)))
        {
            throw new NotSupportedException($"{Name ?? "image"}: a tiered image keeps compat=1.1 and its refcount width (detach the tier first)");
        }
        // Quiet: allocations in flight land first, new writes wait on the metadata lock meanwhile.
        while (true)
        {
            Task? landing;
            lock (_lock)
            {
                landing = _inflight.Count == 0 ? null : _inflight.Values.First().Task;
                if (landing is null)
                {
                    AmendLocked(newVersion, lazyRefcounts, refcountBits);
                    return;
                }
            }
            landing.GetAwaiter().GetResult();
        }
    }

    private void AmendLocked(uint newVersion, bool? lazyRefcounts, int? refcountBits)
    {
        FlushLocked();
        if (newVersion > Header.Version)
        {
            RewriteHeader(newVersion);
        }
        if (refcountBits is { } bits && bits != Header.RefcountBits)
        {
            ChangeRefcountOrder(BitOperations.Log2((uint)bits));
        }
        if (lazyRefcounts is { } lazy && lazy != Lazy)
        {
            if (!lazy)
            {
                // The refcounts on disk must be right before nothing says they may not be.
                FlushLocked();
                ClearDirtyBit();
            }
            Header.CompatibleFeatures = lazy ? Header.CompatibleFeatures | QcowHeader.CompatLazyRefcounts : Header.CompatibleFeatures & ~QcowHeader.CompatLazyRefcounts;
            WriteHeaderU64(QcowHeader.OffsetCompatibleFeatures, Header.CompatibleFeatures);
            File.Flush();
        }
        if (newVersion < Header.Version)
        {
            Downgrade();
        }
    }

    private void Downgrade()
    {
        if (Header.RefcountOrder != 4)
        {
            throw new NotSupportedException("compat=0.10 requires refcount_bits=16");
        }
        if ((Header.IncompatibleFeatures & QcowHeader.IncompatExternalDataFile) != 0)
        {
            throw new NotSupportedException("Cannot downgrade an image with a data file");
        }
        FlushLocked();
        ClearDirtyBit();
        if (Header.IncompatibleFeatures != 0)
        {
            throw new NotSupportedException($"Cannot downgrade an image with incompatible features 0x{Header.IncompatibleFeatures:x} set");
        }
        ExpandZeroClusters();
        RewriteHeader(2);
    }

    /// <summary>Version 2 has no zero flag: plain zero clusters become unallocated (no backing file), preallocated ones get zeroes.</summary>
    private void ExpandZeroClusters()
    {
        var entries = 1 << _l2Bits;
        for (var i = 0; i < _l1.Length; i++)
        {
            var table = GetL2(i);
            if (table is null)
            {
                continue;
            }
            var any = false;
            for (var j = 0; j < entries && !any; j++)
            {
                any = ClusterKinds.Classify(Entry(table, j)) is ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated;
            }
            if (!any)
            {
                continue;
            }
            var (writable, off) = GetL2ForWrite(i);
            for (var j = 0; j < entries; j++)
            {
                var e = Entry(writable, j);
                switch (ClusterKinds.Classify(e))
                {
                    case ClusterKind.ZeroPlain:
                        SetEntry(writable, j, 0);
                        break;
                    case ClusterKind.ZeroAllocated:
                        var host = ValidateDataOffset(e, off, j);
                        CheckOverlap(host, _clusterSize, Meta.None);
                        File.Write(host, _zeroCluster);
                        Volatile.Write(ref _unsynced, 1);
                        SetEntry(writable, j, e & ~ClusterLayout.Zero);
                        break;
                }
            }
            _l2.MarkDirty(off);
        }
        // The zeroes are durable before the tables that drop the zero flags (the usual flush order).
        FlushLocked();
    }

    /// <summary>
    /// Rewrites the header and its extensions as <paramref name="version"/>: QEMU's feature name table
    /// for version 3 (none for version 2); other extensions are kept in order; unknown header fields and
    /// the feature bits do not exist in version 2. One write from offset 0.
    /// </summary>
    private void RewriteHeader(uint version)
    {
        var exts = Header.Extensions.Where(e => e.Type != HeaderExtension.FeatureNameTable && (version >= 3 || e.Type != HeaderExtension.Bitmaps)).ToList();
        if (version >= 3 && _clusterSize >= QcowCreator.QemuFeatureTableMinCluster)
        {
            // Where QEMU puts it, and only where QEMU writes one at all (clusters of 8 KiB and more).
            exts.Insert(exts.FindIndex(e => e.Type != HeaderExtension.BackingFormat && e.Type != HeaderExtension.ExternalDataFile) is var i and >= 0 ? i : exts.Count,
                new HeaderExtension(HeaderExtension.FeatureNameTable, HeaderExtension.QemuFeatureNameTable(), 0));
        }
        var headerLength = version >= 3 ? QcowHeader.V3Length : QcowHeader.V2Length;
        var size = headerLength + exts.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8;
        if (size > _clusterSize)
        {
            throw new NotSupportedException($"{Name ?? "image"}: the header and its extensions ({size} bytes) do not fit in one {_clusterSize}-byte cluster");
        }
        var oldEnd = Header.Extensions.Count == 0 ? Header.HeaderLength + 8 : (int)Header.Extensions.Max(e => e.Offset + 8 + ((e.Data.Length + 7) & ~7)) + 8;
        var buf = new byte[Math.Max(size, oldEnd)];
        var h = buf.AsSpan();
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetMagic..], QcowHeader.Magic);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetVersion..], version);
        BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetBackingFileOffset..], Header.BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetBackingFileSize..], Header.BackingFileSize);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetClusterBits..], (uint)Header.ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetSize..], (ulong)Header.Size);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetCryptMethod..], Header.CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetL1Size..], Header.L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetL1TableOffset..], (ulong)Header.L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetRefcountTableOffset..], (ulong)Header.RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetRefcountTableClusters..], Header.RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetNbSnapshots..], Header.NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetSnapshotsOffset..], (ulong)Header.SnapshotsOffset);
        if (version >= 3)
        {
            BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetIncompatibleFeatures..], Header.Version >= 3 ? Header.IncompatibleFeatures : 0);
            BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetCompatibleFeatures..], Header.Version >= 3 ? Header.CompatibleFeatures : 0);
            BinaryPrimitives.WriteUInt64BigEndian(h[QcowHeader.OffsetAutoclearFeatures..], Header.Version >= 3 ? Header.AutoclearFeatures : 0);
            BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetRefcountOrder..], (uint)Header.RefcountOrder);
            BinaryPrimitives.WriteUInt32BigEndian(h[QcowHeader.OffsetHeaderLength..], (uint)headerLength);
            h[QcowHeader.OffsetCompressionType] = Header.CompressionType;
        }
        var pos = headerLength;
        var placed = new List<HeaderExtension>();
        foreach (var e in exts)
        {
            BinaryPrimitives.WriteUInt32BigEndian(h[pos..], e.Type);
            BinaryPrimitives.WriteUInt32BigEndian(h[(pos + 4)..], (uint)e.Data.Length);
            e.Data.CopyTo(h[(pos + 8)..]);
            placed.Add(e with { Offset = pos });
            pos += 8 + ((e.Data.Length + 7) & ~7);
        }
        CheckOverlap(0, buf.Length, Meta.Header);
        File.Write(0, buf);
        File.Flush();
        if (version < 3)
        {
            Header.IncompatibleFeatures = 0;
            Header.CompatibleFeatures = 0;
            Header.AutoclearFeatures = 0;
        }
        Header.Version = version;
        Header.HeaderLength = headerLength;
        Header.Extensions.Clear();
        Header.Extensions.AddRange(placed);
    }

    /// <summary>Writes the refcounts anew with 2^<paramref name="newOrder"/>-bit entries and switches to them (QEMU's qcow2_change_refcount_order).</summary>
    private void ChangeRefcountOrder(int newOrder)
    {
        FlushLocked();
        var max = RefcountBlock.MaxValue(newOrder);
        var perBlock = (long)_clusterSize * 8 >> newOrder;
        var last = _refcounts.LastUsedCluster();
        for (var c = 0L; c <= last; c++)
        {
            var r = _refcounts.Get(c);
            if (r > max)
            {
                throw new NotSupportedException($"Cannot decrease refcount entry width to {1 << newOrder} bits: Cluster at offset 0x{c << _clusterBits:x} has a refcount of {r}");
            }
        }

        // Room for the new table and blocks, allocated through the old refcounts: until the switch they
        // are merely used clusters of a valid image. Their own allocation may push the last used
        // cluster (and so the blocks needed) further: repeat until the run covers everything.
        long run = -1;
        int blocks = 0, tableClusters = 0;
        while (true)
        {
            last = _refcounts.LastUsedCluster();
            var needBlocks = (int)QcowHeader.CeilDiv(last + 1, perBlock);
            if (run >= 0 && needBlocks <= blocks)
            {
                break;
            }
            if (run >= 0)
            {
                _refcounts.FreeNow(run, tableClusters + blocks);
            }
            blocks = needBlocks + 1 + (int)QcowHeader.CeilDiv(needBlocks + 8, perBlock);
            tableClusters = (int)QcowHeader.CeilDiv(blocks * 8L, _clusterSize);
            if ((long)tableClusters * _clusterSize > QcowHeader.MaxRefcountTableBytes)
            {
                throw new NotSupportedException($"{Name ?? "image"}: the refcount table for {1 << newOrder}-bit refcounts would exceed qcow2's limit");
            }
            run = _refcounts.Allocate(tableClusters + blocks, out _);
        }
        _refcounts.WriteBack();
        File.Flush();

        // The new blocks (counting every cluster in use now, the run included) and the table pointing at them.
        var tableOffset = run;
        var table = new byte[(long)tableClusters * _clusterSize];
        var block = new byte[_clusterSize];
        for (var b = 0; b < blocks; b++)
        {
            Array.Clear(block);
            var first = b * perBlock;
            for (var c = first; c < Math.Min(first + perBlock, last + 1); c++)
            {
                RefcountBlock.Set(block, (int)(c - first), newOrder, _refcounts.Get(c));
            }
            var blockOffset = run + ((long)(tableClusters + b) << _clusterBits);
            File.Write(blockOffset, block);
            BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(b * 8), (ulong)blockOffset);
        }
        File.Write(tableOffset, table);
        File.Flush();

        // The switch: table offset, table size and refcount order in one write inside the first sector.
        var oldTable = (Offset: Header.RefcountTableOffset, Clusters: (int)Header.RefcountTableClusters);
        var oldBlocks = _refcounts.Table.Where(o => o != 0).ToArray();
        var span = new byte[QcowHeader.OffsetRefcountOrder + 4 - QcowHeader.OffsetRefcountTableOffset];
        BinaryPrimitives.WriteUInt64BigEndian(span, (ulong)tableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(span.AsSpan(8), (uint)tableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(span.AsSpan(12), Header.NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(span.AsSpan(16), (ulong)Header.SnapshotsOffset);
        BinaryPrimitives.WriteUInt64BigEndian(span.AsSpan(24), Header.IncompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(span.AsSpan(32), Header.CompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(span.AsSpan(40), Header.AutoclearFeatures);
        BinaryPrimitives.WriteUInt32BigEndian(span.AsSpan(48), (uint)newOrder);
        File.Write(QcowHeader.OffsetRefcountTableOffset, span);
        File.Flush();
        Header.RefcountTableOffset = tableOffset;
        Header.RefcountTableClusters = (uint)tableClusters;
        Header.RefcountOrder = newOrder;
        InitCaches();

        // The old table and blocks are now merely used clusters of the new refcounts: free them.
        _refcounts.FreeNow(oldTable.Offset, oldTable.Clusters);
        foreach (var off in oldBlocks)
        {
            _refcounts.FreeNow(off, 1);
        }
        _refcounts.WriteBack();
        File.Flush();
        Reclaim(File, [.. Enumerable.Range(0, oldTable.Clusters).Select(i => (oldTable.Offset >> _clusterBits) + i).Concat(oldBlocks.Select(o => o >> _clusterBits)).Order()]);
    }
}
