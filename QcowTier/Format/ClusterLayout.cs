namespace QcowTier.Format;

/// <summary>L1 and L2 entry bits (docs/interop/qcow2.txt, "Cluster mapping").</summary>
internal static class ClusterLayout
{
    /// <summary>Refcount of the cluster is exactly one: it may be written in place.</summary>
    public const ulong Copied = 1UL << 63;
    /// <summary>L2 only: the cluster is compressed.</summary>
    public const ulong Compressed = 1UL << 62;
    /// <summary>L2 only (v3): the cluster reads as zeroes.</summary>
    public const ulong Zero = 1UL;

    /// <summary>Bits 9-55 of an L1 entry: the L2 table's offset.</summary>
    public const ulong L1OffsetMask = 0x00fffffffffffe00UL;
    /// <summary>Bits 9-55 of a standard L2 entry: the host cluster offset.</summary>
    public const ulong L2OffsetMask = 0x00fffffffffffe00UL;
    /// <summary>L1 bits 1-8 and 56-62 must be zero.</summary>
    public const ulong L1ReservedMask = 0x7f000000000001feUL;
    /// <summary>Standard L2 bits 1-8 and 56-61 must be zero.</summary>
    public const ulong L2ReservedMask = 0x3f000000000001feUL;
}
