using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>What an L2 entry says about its guest cluster (QEMU's QCow2ClusterType).</summary>
internal enum ClusterKind
{
    Unallocated,
    ZeroPlain,
    ZeroAllocated,
    Normal,
    Compressed,
}

internal static class ClusterKinds
{
    public static ClusterKind Classify(ulong entry)
    {
        if ((entry & ClusterLayout.Compressed) != 0)
        {
            return ClusterKind.Compressed;
        }
        var hasOffset = (entry & ClusterLayout.L2OffsetMask) != 0;
        if ((entry & ClusterLayout.Zero) != 0)
        {
            return hasOffset ? ClusterKind.ZeroAllocated : ClusterKind.ZeroPlain;
        }
        return hasOffset ? ClusterKind.Normal : ClusterKind.Unallocated;
    }
}
