namespace QcowTier;

/// <summary>Latency and bandwidth of one storage tier, for predictions and duration estimates.</summary>
/// <param name="Latency">Time of one small random I/O.</param>
/// <param name="BytesPerSecond">Sequential bandwidth.</param>
public sealed record DeviceModel(TimeSpan Latency, double BytesPerSecond)
{
    /// <summary>A SATA SSD: 0.1 ms, 500 MB/s.</summary>
    public static DeviceModel Ssd { get; } = new(TimeSpan.FromMilliseconds(0.1), 500e6);

    /// <summary>A 7200 rpm disk: 8 ms, 150 MB/s.</summary>
    public static DeviceModel Hdd { get; } = new(TimeSpan.FromMilliseconds(8), 150e6);
}

/// <summary>What the rebalancer may do, and how it weighs heat.</summary>
public sealed class RebalancePolicy
{
    /// <summary>SSD budget in bytes of data per image, or (with <see cref="SharedBudget"/>) for all images together. Null: use <see cref="SsdBudgetPercent"/>, else each image's own SSD budget.</summary>
    public long? SsdBudgetBytes { get; init; }

    /// <summary>SSD budget as a percentage of each image's virtual size (0–100).</summary>
    public double? SsdBudgetPercent { get; init; }

    /// <summary>Rank all images' units together against one budget (<see cref="SsdBudgetBytes"/>), as a host-wide SSD pool.</summary>
    public bool SharedBudget { get; init; }

    /// <summary>
    /// A unit on HDD displaces an SSD resident only when its score exceeds the resident's by this factor
    /// (and by <see cref="MinimumScoreGap"/>), so a second run on the same heat moves nothing. Default 1.5.
    /// </summary>
    public double Hysteresis { get; init; } = 1.5;

    /// <summary>Absolute score margin a promotion must also clear over the unit it displaces. Default 2 operations.</summary>
    public double MinimumScoreGap { get; init; } = 2;

    /// <summary>A unit needs at least this score to be promoted at all. Default 1.</summary>
    public double MinimumPromotionScore { get; init; } = 1;

    /// <summary>Cap on bytes copied per run; null for none.</summary>
    public long? MaxMoveBytes { get; init; }

    /// <summary>Cap on copy throughput in bytes per second; null for none.</summary>
    public double? ThrottleBytesPerSecond { get; init; }

    /// <summary>Weight of a read in a unit's score. Default 1.</summary>
    public double ReadWeight { get; init; } = 1;

    /// <summary>Weight of a write in a unit's score. Default 1.</summary>
    public double WriteWeight { get; init; } = 1;

    /// <summary>
    /// Runs of neighbouring units at least this long whose I/O was mostly sequential (see
    /// <see cref="HeatUnit.Sequential"/>) are ranked by their random I/O only, so long scans stay on HDD,
    /// whose bandwidth serves them well. Null (the default) ranks every unit by its whole score.
    /// </summary>
    public long? SequentialRunBytes { get; init; }

    /// <summary>
    /// Skew threshold: when the hottest 20 % of the allocated data serves less than this share of the I/O,
    /// the plan says tiering will not help and proposes no promotions. Default 0.3.
    /// </summary>
    public double MinimumSkew { get; init; } = 0.3;

    /// <summary>The SSD tier's device model.</summary>
    public DeviceModel Ssd { get; init; } = DeviceModel.Ssd;

    /// <summary>The HDD tier's device model.</summary>
    public DeviceModel Hdd { get; init; } = DeviceModel.Hdd;
}
