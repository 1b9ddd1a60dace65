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

    private static void CheckExtendedL2(QcowHeader h, bool readOnly, string? name)
    {
        if ((h.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) == 0)
        {
            return;
        }
        if (h.ClusterBits < 14)
        {
            ThrowHelper.Corrupt(name, QcowHeader.OffsetClusterBits, "cluster_bits", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        }
        if (!readOnly)
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "writing images with extended L2 entries (subclusters) is not supported yet; open the image read-only");
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
}
