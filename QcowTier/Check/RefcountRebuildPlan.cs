using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>
/// Where a rebuilt refcount structure goes: a refcount table followed by one block for every block
/// range that holds a referenced cluster, all in the primary file from cluster <see cref="Start"/> on.
/// For the primary file's own refcounts the new clusters need refcounts too, which may need more
/// blocks and a larger table; the sizes are iterated to a fixed point. The HDD data file's refcounts
/// are hosted in the primary file and describe none of their own clusters.
/// </summary>
internal sealed class RefcountRebuildPlan
{
    private readonly long[] _blockIndices;
    private readonly int _blockBits;
    private readonly int _clusterBits;
    private readonly int _clusterSize;

    private RefcountRebuildPlan(long start, int tableClusters, long[] blockIndices, int blockBits, int clusterBits, int clusterSize)
    {
        Start = start;
        TableClusters = tableClusters;
        _blockIndices = blockIndices;
        _blockBits = blockBits;
        _clusterBits = clusterBits;
        _clusterSize = clusterSize;
    }

    /// <summary>First cluster (of the primary file) of the new structure.</summary>
    public long Start { get; }

    public long TableOffset => Start << _clusterBits;

    public int TableClusters { get; }

    /// <summary>Clusters the new structure occupies.</summary>
    public long Clusters => TableClusters + _blockIndices.LongLength;

    /// <param name="refs">The counts the structure must record.</param>
    /// <param name="start">First free cluster of the primary file to place it at.</param>
    /// <param name="selfDescribing">The structure counts clusters of the file it lives in (the primary's own).</param>
    /// <param name="clusterBits">log2 of the cluster size.</param>
    /// <param name="refcountOrder">log2 of the refcount width.</param>
    /// <returns>Null when the table would exceed QEMU's 8 MiB limit.</returns>
    public static RefcountRebuildPlan? Create(ReferenceCounts refs, long start, bool selfDescribing, int clusterBits, int refcountOrder)
    {
        var clusterSize = 1 << clusterBits;
        var blockBits = clusterBits + 3 - refcountOrder;
        var perBlock = 1L << blockBits;
        var used = new List<long>();
        for (long b = 0; b << blockBits < refs.Length; b++)
        {
            if (refs.AnyInRange(b << blockBits, perBlock))
            {
                used.Add(b);
            }
        }
        long count = 0;
        // Each round can only add clusters, and a table cluster or block covers far more clusters than
        // it adds, so this settles within a few rounds; the bound is a guard, not a tuning knob.
        for (var round = 0; round < 64; round++)
        {
            var blocks = selfDescribing ? BlocksFor(used, start, count, blockBits) : used;
            var entries = blocks.Count == 0 ? 1 : blocks[^1] + 1;
            if (entries * 8 > QcowHeader.MaxRefcountTableBytes)
            {
                return null;
            }
            var tableClusters = (int)((entries * 8 + clusterSize - 1) / clusterSize);
            var need = blocks.Count + tableClusters;
            if (need == count || !selfDescribing)
            {
                return new RefcountRebuildPlan(start, tableClusters, blocks.ToArray(), blockBits, clusterBits, clusterSize);
            }
            count = need;
        }
        return null;
    }

    private static List<long> BlocksFor(List<long> used, long start, long count, int blockBits)
    {
        var blocks = new List<long>(used);
        if (count > 0)
        {
            var first = start >> blockBits;
            var last = (start + count - 1) >> blockBits;
            for (var b = first; b <= last; b++)
            {
                if (blocks.Count == 0 || blocks[^1] < b)
                {
                    blocks.Add(b);
                }
            }
        }
        return blocks;
    }

    /// <summary>Counts the structure's own clusters in the primary file's references: they are in use from now on.</summary>
    public void MarkAllocated(ReferenceCounts primaryRefs)
    {
        for (var c = Start; c < Start + Clusters; c++)
        {
            primaryRefs.SetAllocated(c);
        }
    }

    /// <summary>Writes the blocks, then the table, into the primary file. Nothing points at them yet; the caller flushes and switches.</summary>
    public void Write(ImageStorage primary, ReferenceCounts refs, int refcountOrder)
    {
        var perBlock = 1L << _blockBits;
        var table = new byte[(long)TableClusters * _clusterSize];
        var block = new byte[_clusterSize];
        for (var k = 0; k < _blockIndices.Length; k++)
        {
            var index = _blockIndices[k];
            Array.Clear(block);
            var first = index << _blockBits;
            var end = Math.Min(refs.Length, first + perBlock);
            for (var c = first; c < end; c++)
            {
                var v = refs[c];
                if (v != 0)
                {
                    RefcountBlock.Set(block, (int)(c - first), refcountOrder, v);
                }
            }
            var offset = (Start + TableClusters + k) << _clusterBits;
            primary.Write(offset, block);
            BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan((int)(index * 8)), (ulong)offset);
        }
        primary.Write(TableOffset, table);
    }
}
