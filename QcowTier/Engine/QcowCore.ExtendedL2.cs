using System.Buffers.Binary;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Extended L2 entries (incompatible bit 4, qcow2.txt "Extended L2 Entries"): 128-bit entries, the
/// standard descriptor followed by a bitmap whose bits 0-31 say which of the cluster's 32 subclusters
/// are allocated (their data is in the host cluster) and bits 32-63 which read as zeroes. The zero flag
/// (bit 0) of the descriptor is not used. The subcluster kinds are QEMU's qcow2_get_subcluster_type.
/// </summary>
internal sealed partial class QcowCore
{
    private const int Subclusters = 32;
    private const ulong AllAllocBits = 0xffffffffUL;

    private readonly bool _extendedL2;
    private readonly int _entryShift; // log2 of the L2 entry size: 3, or 4 with extended L2

    private int SubclusterBits => _clusterBits - 5;

    private static ulong AllocBit(int sc) => 1UL << sc;

    private static ulong ZeroBit(int sc) => 1UL << (sc + 32);

    private ulong Bitmap(byte[] table, int index) => BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan((index << 4) + 8));

    private static void CheckExtendedL2(QcowHeader h, string? name)
    {
        if ((h.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) == 0)
        {
            return;
        }
        if (h.ClusterBits < 14)
        {
            ThrowHelper.Corrupt(name, QcowHeader.OffsetClusterBits, "cluster_bits", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        }
        if (h.Extensions.Any(e => e.Type == TierExtension.Type))
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "tiered images with extended L2 entries are not supported");
        }
    }

    private enum SubclusterKind
    {
        UnallocatedPlain,
        UnallocatedAlloc,
        ZeroPlain,
        ZeroAlloc,
        Normal,
        Invalid,
    }

    /// <summary>QEMU's qcow2_get_subcluster_type for a standard (not compressed) extended entry.</summary>
    private static SubclusterKind Classify(ulong entry, ulong bitmap, int sc)
    {
        var allocated = (entry & ClusterLayout.L2OffsetMask) != 0;
        if (allocated)
        {
            if (((bitmap >> 32) & bitmap) != 0)
            {
                return SubclusterKind.Invalid;
            }
            if ((bitmap & ZeroBit(sc)) != 0)
            {
                return SubclusterKind.ZeroAlloc;
            }
            return (bitmap & AllocBit(sc)) != 0 ? SubclusterKind.Normal : SubclusterKind.UnallocatedAlloc;
        }
        if ((bitmap & AllAllocBits) != 0)
        {
            return SubclusterKind.Invalid;
        }
        return (bitmap & ZeroBit(sc)) != 0 ? SubclusterKind.ZeroPlain : SubclusterKind.UnallocatedPlain;
    }

    /// <summary>
    /// Maps a run of subclusters of one kind inside one cluster. Kinds map onto <see cref="ClusterKind"/>:
    /// a subcluster reading as zeroes is Zero(Plain/Allocated), one not allocated is Unallocated (with the
    /// cluster's host offset when the cluster has one, as qemu-img map shows it).
    /// </summary>
    private Mapping MapExtendedLocked(long offset, long maxBytes, bool stopAtInflight)
    {
        _ = stopAtInflight; // runs never leave their cluster, so they never reach another in-flight cluster
        var l2Entries = 1 << _l2Bits;
        var l1Index = (int)(offset >> (_clusterBits + _l2Bits));
        var l2Index = (int)((offset >> _clusterBits) & (l2Entries - 1));
        var inCluster = (int)(offset & (_clusterSize - 1));
        maxBytes = Math.Min(maxBytes, _clusterSize - inCluster);
        if (l1Index >= _l1.Length)
        {
            return new Mapping(ClusterKind.Unallocated, 0, maxBytes);
        }
        var l2 = GetL2(l1Index);
        if (l2 is null)
        {
            return new Mapping(ClusterKind.Unallocated, 0, maxBytes);
        }
        var l2Off = (long)(_l1[l1Index] & ClusterLayout.L1OffsetMask);
        var e = Entry(l2, l2Index);
        if ((e & ClusterLayout.Compressed) != 0)
        {
            return new Mapping(ClusterKind.Compressed, 0, maxBytes, 0, e);
        }
        var bitmap = Bitmap(l2, l2Index);
        var sc = inCluster >> SubclusterBits;
        var kind = Classify(e, bitmap, sc);
        if (kind == SubclusterKind.Invalid)
        {
            SignalCorruption(l2Off + ((long)l2Index << 4), "L2 entry", $"Invalid cluster entry found (L2 offset: 0x{l2Off:x}, L2 index: 0x{l2Index:x})");
        }
        long host = 0;
        if ((e & ClusterLayout.L2OffsetMask) != 0)
        {
            host = ValidateDataOffset(e & ~ClusterLayout.Zero, l2Off, l2Index) + inCluster;
        }
        var bytes = ((long)(sc + 1) << SubclusterBits) - inCluster;
        for (var next = sc + 1; next < Subclusters && bytes < maxBytes && Classify(e, bitmap, next) == kind; next++)
        {
            bytes += 1L << SubclusterBits;
        }
        bytes = Math.Min(bytes, maxBytes);
        return kind switch
        {
            SubclusterKind.Normal => new Mapping(ClusterKind.Normal, host, bytes),
            SubclusterKind.ZeroAlloc => new Mapping(ClusterKind.ZeroAllocated, host, bytes),
            SubclusterKind.ZeroPlain => new Mapping(ClusterKind.ZeroPlain, 0, bytes),
            SubclusterKind.UnallocatedAlloc => new Mapping(ClusterKind.Unallocated, host, bytes),
            _ => new Mapping(ClusterKind.Unallocated, 0, bytes),
        };
    }

    // ---------------------------------------------------------------- writing

    private const ulong AllZeroBits = 0xffffffff00000000UL;

    private void SetBitmap(byte[] table, int index, ulong bitmap) => BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan((index << 4) + 8), bitmap);

    /// <summary>Allocation bits of subclusters [first, last].</summary>
    private static ulong AllocRange(int first, int last) => (last == 31 ? AllAllocBits : (1UL << (last + 1)) - 1) & ~((1UL << first) - 1);

    private static ulong ZeroRange(int first, int last) => AllocRange(first, last) << 32;

    private static bool IsNormalSubcluster(ulong bitmap, int sc) => (bitmap & AllocBit(sc)) != 0 && (bitmap & ZeroBit(sc)) == 0;

    /// <summary>
    /// The write planner for extended L2 images (lock held, the cluster not in flight), one cluster per
    /// step as QEMU: subclusters already allocated in a COPIED cluster are written in place; otherwise the
    /// cluster is filled in place (its bitmap updated at commit), allocated, or copied (shared or compressed).
    /// </summary>
    private WritePlan PlanWriteExtended(long offset, int length)
    {
        var guestCluster = offset >> _clusterBits;
        var head = (int)(offset & (_clusterSize - 1));
        var bytes = Math.Min(length, _clusterSize - head);
        var l1Index = (int)(offset >> (_clusterBits + _l2Bits));
        var index = (int)(guestCluster & ((1 << _l2Bits) - 1));
        var l2 = l1Index < _l1.Length ? GetL2(l1Index) : null;
        ulong e = 0, bitmap = 0;
        if (l2 is not null)
        {
            e = Entry(l2, index);
            bitmap = Bitmap(l2, index);
        }
        var firstSc = head >> SubclusterBits;
        var lastSc = (head + bytes - 1) >> SubclusterBits;
        var plan = new WritePlan { Kind = PlanKind.Allocate, GuestCluster = guestCluster, Head = head, CowSource = -1, Clusters = 1 };
        if ((e & ClusterLayout.Compressed) != 0)
        {
            plan.CowCompressed = head != 0 || bytes < _clusterSize ? e : 0;
        }
        else if ((e & ClusterLayout.L2OffsetMask) != 0)
        {
            var l2Off = (long)(_l1[l1Index] & ClusterLayout.L1OffsetMask);
            if (Classify(e, bitmap, firstSc) == SubclusterKind.Invalid)
            {
                SignalCorruption(l2Off + ((long)index << 4), "L2 entry", $"Invalid cluster entry found (L2 offset: 0x{l2Off:x}, L2 index: 0x{index:x})");
            }
            var host = ValidateDataOffset(e & ~ClusterLayout.Zero, l2Off, index);
            if (IsCopied(offset))
            {
                var allNormal = true;
                for (var sc = firstSc; sc <= lastSc && allNormal; sc++)
                {
                    allNormal = IsNormalSubcluster(bitmap, sc);
                }
                if (allNormal)
                {
                    CheckOverlap(host + head, bytes, Meta.None);
                    Interlocked.Increment(ref _activeIo);
                    Interlocked.Increment(ref _activeWrites);
                    return new WritePlan { Kind = PlanKind.InPlace, Host = host + head, Bytes = bytes };
                }
                plan.Reused = true;
                plan.Host = host;
            }
            else
            {
                plan.CowSource = host; // shared: the whole cluster is copied, its bitmap kept
            }
        }
        MarkDirtyIfLazy();
        GetL2ForWrite(l1Index);
        if (!plan.Reused)
        {
            plan.Host = _refcounts.Allocate(1, out plan.Fresh);
            CountInflight(Ssd, 1);
        }
        plan.Bytes = bytes;
        CheckOverlap(plan.Host, _clusterSize, Meta.None);
        plan.Done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _inflight.Add(guestCluster, plan.Done);
        return plan;
    }

    /// <summary>
    /// In-place fill of an allocated cluster whose touched subclusters are not all allocated: what the
    /// guest does not write of a newly allocated subcluster must read as zeroes, so it is written as such;
    /// subclusters already allocated keep their bytes.
    /// </summary>
    private void FillSubclusters(in WritePlan plan, ReadOnlySpan<byte> data)
    {
        ulong bitmap;
        lock (_lock)
        {
            var table = GetL2((int)(plan.GuestCluster >> _l2Bits))!;
            bitmap = Bitmap(table, (int)(plan.GuestCluster & ((1 << _l2Bits) - 1)));
        }
        var file = DataFile(plan.Tier);
        var firstSc = plan.Head >> SubclusterBits;
        var lastSc = (plan.Head + data.Length - 1) >> SubclusterBits;
        var scStart = firstSc << SubclusterBits;
        var scEnd = (lastSc + 1) << SubclusterBits;
        var guestBase = plan.GuestCluster << _clusterBits;
        var hostBase = plan.Host;
        if (plan.Head > scStart && !IsNormalSubcluster(bitmap, firstSc))
        {
            Pad(firstSc, scStart, plan.Head - scStart);
        }
        var tail = plan.Head + data.Length;
        if (tail < scEnd && !IsNormalSubcluster(bitmap, lastSc))
        {
            Pad(lastSc, tail, scEnd - tail);
        }
        file.Write(plan.Host + plan.Head, data);

        // The unwritten part of a newly allocated subcluster keeps what it read before: zeroes when its
        // zero bit is set or there is no backing file, else the backing file's bytes (QEMU's COW).
        void Pad(int sc, int from, int length)
        {
            if (HasBacking && (bitmap & ZeroBit(sc)) == 0)
            {
                var buf = System.Buffers.ArrayPool<byte>.Shared.Rent(length);
                try
                {
                    ReadBacking(guestBase + from, buf.AsSpan(0, length), forCopy: true);
                    file.Write(hostBase + from, buf.AsSpan(0, length));
                }
                finally
                {
                    System.Buffers.ArrayPool<byte>.Shared.Return(buf);
                }
            }
            else
            {
                file.Write(hostBase + from, _zeroCluster.AsSpan(0, length));
            }
        }
    }

    /// <summary>QEMU's qcow2_alloc_cluster_link_l2 for subclusters: the written ones become allocated and stop reading as zeroes.</summary>
    private void SetBitmapAfterWrite(byte[] table, int index, ulong oldEntry, in WritePlan plan)
    {
        if ((oldEntry & ClusterLayout.Compressed) != 0)
        {
            SetBitmap(table, index, AllAllocBits); // the whole cluster was written
            return;
        }
        var firstSc = plan.Head >> SubclusterBits;
        var lastSc = (plan.Head + plan.Bytes - 1) >> SubclusterBits;
        var bitmap = Bitmap(table, index);
        SetBitmap(table, index, (bitmap | AllocRange(firstSc, lastSc)) & ~ZeroRange(firstSc, lastSc));
    }

    /// <summary>Whole clusters only, as QEMU: allocated ones are freed and then read as zeroes (all zero bits).</summary>
    private void DiscardExtended(long offset, long length)
    {
        var start = (offset + _clusterSize - 1) & ~(long)(_clusterSize - 1);
        var end = offset + length == Size ? offset + length : (offset + length) & ~(long)(_clusterSize - 1);
        for (var pos = start; pos < end; pos += _clusterSize)
        {
            UpdateSubclusters(pos, (e, bitmap) =>
            {
                if ((e & (ClusterLayout.L2OffsetMask | ClusterLayout.Compressed)) == 0)
                {
                    return (e, bitmap);
                }
                FreeCluster(e);
                return (0, AllZeroBits);
            });
        }
    }

    /// <summary>
    /// QEMU's subcluster zeroing: whole clusters get every zero bit (unmapped when allowed, compressed ones
    /// always), whole subclusters get their zero bits, and partial subclusters are written with zeroes.
    /// </summary>
    private void WriteZeroesExtended(long offset, long length, bool mayUnmap)
    {
        var end = offset + length;
        var sc = 1L << SubclusterBits;
        for (var pos = offset; pos < end;)
        {
            var clusterStart = pos & ~(long)(_clusterSize - 1);
            var segEnd = Math.Min(end, clusterStart + _clusterSize);
            var a = (pos + sc - 1) & ~(sc - 1);
            var b = segEnd == Size ? Math.Min((segEnd + sc - 1) & ~(sc - 1), clusterStart + _clusterSize) : segEnd & ~(sc - 1);
            if (a >= b)
            {
                ZeroPartial(pos, segEnd - pos);
            }
            else
            {
                if (pos < a)
                {
                    ZeroPartial(pos, a - pos);
                }
                if (b < segEnd)
                {
                    ZeroPartial(b, segEnd - b);
                }
                var whole = a == clusterStart && b == clusterStart + _clusterSize;
                var first = (int)((a - clusterStart) >> SubclusterBits);
                var last = (int)((b - clusterStart - 1) >> SubclusterBits);
                var fallback = false;
                UpdateSubclusters(clusterStart, (e, bitmap) =>
                {
                    var compressed = (e & ClusterLayout.Compressed) != 0;
                    if (whole)
                    {
                        if ((mayUnmap || compressed) && (e & (ClusterLayout.L2OffsetMask | ClusterLayout.Compressed)) != 0)
                        {
                            FreeCluster(e);
                            e = 0;
                        }
                        return (e, AllZeroBits);
                    }
                    if (compressed)
                    {
                        fallback = true; // QEMU too cannot mark part of a compressed cluster: it writes zeroes
                        return (e, bitmap);
                    }
                    return (e, (bitmap | ZeroRange(first, last)) & ~AllocRange(first, last));
                });
                if (fallback)
                {
                    WriteZeroBuffer(a, Math.Min(b, Size) - a);
                }
            }
            pos = segEnd;
        }
    }

    /// <summary>Rewrites one cluster's entry and bitmap once it is not in flight.</summary>
    private void UpdateSubclusters(long clusterOffset, Func<ulong, ulong, (ulong Entry, ulong Bitmap)> update)
    {
        var guestCluster = clusterOffset >> _clusterBits;
        var l1Index = (int)(clusterOffset >> (_clusterBits + _l2Bits));
        var index = (int)(guestCluster & ((1 << _l2Bits) - 1));
        while (true)
        {
            Task? wait;
            lock (_lock)
            {
                wait = _quiesce?.Task ?? (_inflight.TryGetValue(guestCluster, out var tcs) ? tcs.Task : null);
                if (wait is null)
                {
                    MarkDirtyIfLazy();
                    var (table, l2Off) = GetL2ForWrite(l1Index);
                    var e = Entry(table, index);
                    var bitmap = Bitmap(table, index);
                    var (ne, nb) = update(e, bitmap);
                    if (ne != e || nb != bitmap)
                    {
                        SetEntry(table, index, ne);
                        SetBitmap(table, index, nb);
                        _l2.MarkDirty(l2Off);
                    }
                    return;
                }
            }
            wait.GetAwaiter().GetResult();
        }
    }
}
