using System.Numerics;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// qemu-img measure for qcow2 targets (QEMU's qcow2_measure): the size a fully allocated image of a
/// virtual size takes, and the size an image needs to hold a given amount of data. Both count the
/// metadata of the fully allocated image (header, L1, every L2 table, refcount table and blocks), so
/// "required" over-estimates a sparse image by design, exactly as QEMU does.
/// </summary>
internal static class QcowMeasure
{
    public static QcowMeasurement Measure(long virtualSize, QcowCreateOptions o, long dataBytes, bool extendedL2 = false)
    {
        QcowCreator.Validate(virtualSize, o);
        long cs = o.ClusterSize;
        var aligned = RoundUp(virtualSize, cs);
        var entrySize = extendedL2 ? 16L : 8L;
        var l2Tables = QcowHeader.CeilDiv(aligned / cs, cs / entrySize);
        if (l2Tables * 8 > QcowHeader.MaxL1Bytes)
        {
            throw new ArgumentException("The image size is too large (try using a larger cluster size)", nameof(virtualSize));
        }
        var full = FullyAllocated(aligned, cs, BitOperations.Log2((uint)o.RefcountBits), entrySize);
        var data = o.Preallocation is QcowPreallocation.Falloc or QcowPreallocation.Full ? aligned : Math.Max(0, dataBytes);
        return new QcowMeasurement(full - aligned + data, full);
    }

    /// <summary>Header, L2 tables and L1 table each rounded to whole clusters, refcount structures for all of it, then the data.</summary>
    private static long FullyAllocated(long aligned, long cs, int refcountOrder, long entrySize)
    {
        var meta = cs;
        var l2Entries = RoundUp(aligned / cs, cs / entrySize);
        meta += l2Entries * entrySize;
        var l1Entries = RoundUp(l2Entries * entrySize / cs, cs / 8);
        meta += l1Entries * 8;
        meta += RefcountMetadata((meta + aligned) / cs, cs, refcountOrder);
        return meta + aligned;
    }

    /// <summary>Refcount blocks and table clusters for <paramref name="clusters"/> clusters, counting themselves (fixed point).</summary>
    private static long RefcountMetadata(long clusters, long cs, int refcountOrder)
    {
        var perTableCluster = cs / 8;
        var perBlock = cs * 8 / (1L << refcountOrder);
        long table = 0, blocks = 0, n = 0, last;
        do
        {
            last = n;
            blocks = QcowHeader.CeilDiv(clusters + table + blocks, perBlock);
            table = QcowHeader.CeilDiv(blocks, perTableCluster);
            n = clusters + blocks + table;
        }
        while (n != last);
        return (blocks + table) * cs;
    }

    /// <summary>
    /// The data bytes a copy of a source needs, from its block status runs as qemu-img measure counts
    /// them: each run holding data is extended to the end of its cluster, and counted from the start
    /// of the cluster it begins in; runs that read as zeroes or are unallocated cost nothing.
    /// </summary>
    public static long CountData(IEnumerable<(long Start, long Length, bool Data)> runs, long clusterSize)
    {
        long required = 0, pos = 0;
        foreach (var (start, length, data) in runs)
        {
            var end = start + length;
            if (end <= pos)
            {
                continue;
            }
            var from = Math.Max(start, pos);
            if (!data)
            {
                pos = end;
                continue;
            }
            var bytes = RoundUp(end, clusterSize) - from;
            required += from % clusterSize + bytes;
            pos = from + bytes;
        }
        return required;
    }

    private static long RoundUp(long v, long multiple) => (v + multiple - 1) / multiple * multiple;
}
