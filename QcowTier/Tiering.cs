namespace QcowTier;

/// <summary>The two storage tiers of a tiered image.</summary>
public enum StorageTier
{
    /// <summary>The primary file: fast storage, which also holds all metadata.</summary>
    Ssd = 0,

    /// <summary>The HDD data file: slow, cheap storage for cold clusters.</summary>
    Hdd = 1,
}

/// <summary>How a tiered image places its clusters (qcowtier create -o tier_data_file=...,tier_default=...,ssd_budget=...).</summary>
public sealed class QcowTierOptions
{
    /// <summary>
    /// The HDD data file. Relative paths are taken relative to the image's folder; the file must lie
    /// inside that folder (the image stores its name relative to itself) and must not exist yet.
    /// </summary>
    public required string DataFile { get; init; }

    /// <summary>Where new clusters go when no pin says otherwise. Default SSD.</summary>
    public StorageTier DefaultTier { get; init; } = StorageTier.Ssd;

    /// <summary>Bytes of data clusters the SSD tier may hold before new clusters go to HDD; 0 for no limit.</summary>
    public long SsdBudget { get; init; }
}

/// <summary>A guest range pinned to a tier: new clusters there go to that tier, and the rebalancer never moves them away.</summary>
/// <param name="Start">First guest byte.</param>
/// <param name="Length">Length in bytes.</param>
/// <param name="Tier">The tier.</param>
public readonly record struct TierPin(long Start, long Length, StorageTier Tier);

/// <summary>A run of guest bytes and the tier holding it.</summary>
/// <param name="Start">First guest byte.</param>
/// <param name="Length">Length in bytes.</param>
/// <param name="Tier">The tier holding the data, or null where nothing is allocated.</param>
public readonly record struct TierExtent(long Start, long Length, StorageTier? Tier);

/// <summary>Bytes of allocated clusters on each tier.</summary>
/// <param name="SsdBytes">On the primary file.</param>
/// <param name="HddBytes">On the HDD data file.</param>
public readonly record struct TierUsage(long SsdBytes, long HddBytes);

/// <summary>What a tier move did.</summary>
/// <param name="ClustersMoved">Clusters that changed tier.</param>
/// <param name="BytesMoved">Bytes copied between the files.</param>
/// <param name="Elapsed">Wall-clock time.</param>
public sealed record TierMoveResult(long ClustersMoved, long BytesMoved, TimeSpan Elapsed);
