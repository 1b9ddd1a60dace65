using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Cli.Disks;

/// <summary>
/// qcow2_detect_metadata_preallocation: an image whose refcounted clusters clearly outnumber the
/// clusters the host file really occupies was preallocated with metadata, and QEMU then reports
/// its hole-backed data clusters as zero. Read straight from the file's refcount structures.
/// </summary>
internal static class MetadataPreallocationProbe
{
    public static bool Detect(SafeFileHandle file, long realAllocation)
    {
        if (realAllocation < 0)
        {
            return false;
        }
        Span<byte> header = stackalloc byte[104];
        header.Clear();
        RandomAccess.Read(file, header, 0);
        var version = BinaryPrimitives.ReadUInt32BigEndian(header[4..]);
        var clusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(header[20..]);
        var tableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(header[48..]);
        var tableClusters = BinaryPrimitives.ReadUInt32BigEndian(header[56..]);
        var refcountOrder = version >= 3 ? (int)BinaryPrimitives.ReadUInt32BigEndian(header[96..]) : 4;
        if (clusterBits is < 9 or > 21 || refcountOrder > 6)
        {
            return false;
        }
        var clusterSize = 1L << clusterBits;
        var realClusters = realAllocation / clusterSize;
        var threshold = Math.Max(realClusters * 10 / 9, realClusters + 2);
        var endCluster = (RandomAccess.GetLength(file) + clusterSize - 1) / clusterSize;
        var refcountBits = 1 << refcountOrder;
        var entriesPerBlock = clusterSize * 8 / refcountBits;
        var tableEntries = tableClusters * clusterSize / 8;
        var block = new byte[clusterSize];
        long loadedBlock = -1;
        long blockOffset = 0;
        Span<byte> entry = stackalloc byte[8];
        long count = 0;
        for (long i = 0; i < endCluster && count < threshold; i++)
        {
            var blockIndex = i / entriesPerBlock;
            if (blockIndex >= tableEntries)
            {
                break;
            }
            if (blockIndex != loadedBlock)
            {
                RandomAccess.Read(file, entry, tableOffset + blockIndex * 8);
                blockOffset = (long)(BinaryPrimitives.ReadUInt64BigEndian(entry) & ~0x1FFUL);
                if (blockOffset != 0)
                {
                    RandomAccess.Read(file, block, blockOffset);
                }
                loadedBlock = blockIndex;
            }
            if (blockOffset == 0)
            {
                // Refcount block not allocated: every cluster it covers is free.
                i = (blockIndex + 1) * entriesPerBlock - 1;
                continue;
            }
            if (Refcount(block, (int)(i % entriesPerBlock), refcountBits) != 0)
            {
                count++;
            }
        }
        return count >= threshold;
    }

    private static ulong Refcount(byte[] block, int index, int bits)
    {
        switch (bits)
        {
            case 64:
                return BinaryPrimitives.ReadUInt64BigEndian(block.AsSpan(index * 8));
            case 32:
                return BinaryPrimitives.ReadUInt32BigEndian(block.AsSpan(index * 4));
            case 16:
                return BinaryPrimitives.ReadUInt16BigEndian(block.AsSpan(index * 2));
            case 8:
                return block[index];
            default:
                // Sub-byte widths pack the lowest-numbered entry in the least significant bits.
                var perByte = 8 / bits;
                var b = block[index / perByte];
                return (ulong)((b >> (index % perByte * bits)) & ((1 << bits) - 1));
        }
    }
}
