namespace QcowTier.Format;

/// <summary>
/// The compressed cluster descriptor in bits 0-61 of a compressed L2 entry (qcow2.txt, "Compressed
/// Clusters Descriptor"): with x = 62 - (cluster_bits - 8), bits 0..x-1 hold the host byte offset of the
/// compressed data (neither cluster- nor sector-aligned) and bits x..61 the number of 512-byte sectors
/// it occupies beyond the one holding its first byte. The data may run into the next host cluster.
/// </summary>
internal readonly struct CompressedDescriptor
{
    public const int SectorSize = 512;

    /// <summary>Host offsets above bit 55 are reserved (qcow2.txt): such an entry is corrupt.</summary>
    public const long MaxHostOffset = (1L << 56) - 1;

    /// <summary>Host byte offset of the first compressed byte.</summary>
    public readonly long Offset;

    /// <summary>Bytes from <see cref="Offset"/> to the end of the last sector the descriptor names (at most two clusters).</summary>
    public readonly int Size;

    private CompressedDescriptor(long offset, int size)
    {
        Offset = offset;
        Size = size;
    }

    /// <summary>The bit where the sector count starts (QEMU's csize_shift).</summary>
    public static int SizeShift(int clusterBits) => 62 - (clusterBits - 8);

    public static CompressedDescriptor Decode(ulong entry, int clusterBits)
    {
        var shift = SizeShift(clusterBits);
        var offset = (long)(entry & ((1UL << shift) - 1));
        var sectors = (long)((entry >> shift) & ((1UL << (clusterBits - 8)) - 1)) + 1;
        return new CompressedDescriptor(offset, (int)(sectors * SectorSize - (offset & (SectorSize - 1))));
    }

    /// <summary>The descriptor bits (without the compressed flag) for <paramref name="length"/> bytes at <paramref name="offset"/>.</summary>
    public static ulong Encode(long offset, int length, int clusterBits)
    {
        var extraSectors = (ulong)(((offset + length - 1) / SectorSize) - (offset / SectorSize));
        return (ulong)offset | (extraSectors << SizeShift(clusterBits));
    }

    /// <summary>Whether an offset fits the descriptor's offset field for this cluster size.</summary>
    public static bool OffsetFits(long offset, int clusterBits)
        => offset >= 0 && offset <= MaxHostOffset && offset < (1L << SizeShift(clusterBits));

    /// <summary>The host clusters the descriptor touches, as QEMU counts (and frees) them.</summary>
    public (long First, int Count) Clusters(int clusterBits)
    {
        var first = Offset >> clusterBits;
        var last = (Offset + Size - 1) >> clusterBits;
        return (first, (int)(last - first + 1));
    }
}
