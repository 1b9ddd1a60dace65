using System.Text;

namespace QcowTier;

/// <summary>One move of a plan: a guest range of one image going to a tier, and why.</summary>
/// <param name="Image">Index of the image in the planner's input.</param>
/// <param name="Start">First guest byte.</param>
/// <param name="Length">Bytes of guest range (allocated clusters inside it move).</param>
/// <param name="Bytes">Allocated bytes that will be copied.</param>
/// <param name="To">Destination tier.</param>
/// <param name="Score">Heat score of the range (the highest of its units for a promotion, the lowest for a demotion).</param>
/// <param name="Rank">Rank of that unit in the heat order (1 = hottest).</param>
/// <param name="Reason">Plain-language reason.</param>
public sealed record PlannedMove(int Image, long Start, long Length, long Bytes, StorageTier To, double Score, long Rank, string Reason)
{
    /// <summary>Time the copy takes under the device models (before any throttle).</summary>
    public TimeSpan Cost { get; init; }

    /// <summary>
    /// I/O time the move saves over a window like the heat map's (its operations times the latency gap
    /// between the tiers); negative for a demotion, which gives that much back to free room.
    /// </summary>
    public TimeSpan Benefit { get; init; }
}

/// <summary>Share of reads and writes a placement serves from SSD, as the heat map predicts.</summary>
/// <param name="ReadShare">Share of reads served by SSD (0–1).</param>
/// <param name="WriteShare">Share of writes served by SSD (0–1).</param>
/// <param name="SsdBytes">Bytes of data on SSD.</param>
/// <param name="MeanReadLatency">Mean read latency under the device models.</param>
public readonly record struct PlacementPrediction(double ReadShare, double WriteShare, long SsdBytes, TimeSpan MeanReadLatency);

/// <summary>A rebalancing plan: the moves, their reasons, and what they are predicted to achieve.</summary>
public sealed class RebalancePlan
{
    internal RebalancePlan(IReadOnlyList<PlannedMove> moves, PlacementPrediction before, PlacementPrediction after,
        long budget, bool skewed, double hottest20Share, TimeSpan estimate, IReadOnlyList<string> notes, IReadOnlyList<Guid> images)
    {
        Moves = moves;
        Before = before;
        After = after;
        SsdBudget = budget;
        WorthActing = skewed;
        Hottest20Share = hottest20Share;
        EstimatedDuration = estimate;
        Notes = notes;
        ImageIds = images;
    }

    /// <summary>The moves, demotions first (they make room), each sorted by offset.</summary>
    public IReadOnlyList<PlannedMove> Moves { get; }

    /// <summary>Prediction for the current placement.</summary>
    public PlacementPrediction Before { get; }

    /// <summary>Prediction after the plan is applied.</summary>
    public PlacementPrediction After { get; }

    /// <summary>The SSD budget the plan respects, in bytes (summed over images unless shared).</summary>
    public long SsdBudget { get; }

    /// <summary>False when the workload has no skew worth acting on: tiering will not help, and nothing is promoted.</summary>
    public bool WorthActing { get; }

    /// <summary>Share of the I/O the hottest 20 % of the allocated data serves.</summary>
    public double Hottest20Share { get; }

    /// <summary>Bytes promoted to SSD.</summary>
    public long BytesToSsd => Moves.Where(m => m.To == StorageTier.Ssd).Sum(m => m.Bytes);

    /// <summary>Bytes demoted to HDD.</summary>
    public long BytesToHdd => Moves.Where(m => m.To == StorageTier.Hdd).Sum(m => m.Bytes);

    /// <summary>Estimated time to apply, from the device models (read on one tier, write on the other).</summary>
    public TimeSpan EstimatedDuration { get; }

    /// <summary>Remarks on the plan (verdict, caps hit, pins honoured).</summary>
    public IReadOnlyList<string> Notes { get; }

    /// <summary>The identities of the images planned for, by input index: a plan is applied only to them.</summary>
    public IReadOnlyList<Guid> ImageIds { get; }

    /// <summary>The policy's copy throughput cap, applied between moves.</summary>
    public double? ThrottleBytesPerSecond { get; init; }

    /// <summary>A human-readable explanation of the plan.</summary>
    /// <returns>Several lines of text.</returns>
    public string Explain()
    {
        var sb = new StringBuilder();
        sb.AppendLine(WorthActing
            ? $"Verdict: the hottest 20% of the data serves {Hottest20Share:P0} of the I/O; tiering helps."
            : $"Verdict: no skew worth acting on (the hottest 20% of the data serves only {Hottest20Share:P0} of the I/O); nothing is promoted.");
        sb.AppendLine($"SSD budget {Size(SsdBudget)}; SSD holds {Size(Before.SsdBytes)} now, {Size(After.SsdBytes)} after.");
        sb.AppendLine($"Reads served by SSD: {Before.ReadShare:P1} -> {After.ReadShare:P1}; writes: {Before.WriteShare:P1} -> {After.WriteShare:P1}.");
        sb.AppendLine($"Mean read latency (device model): {Before.MeanReadLatency.TotalMilliseconds:F3} ms -> {After.MeanReadLatency.TotalMilliseconds:F3} ms.");
        sb.AppendLine($"Moves: {Moves.Count} ({Size(BytesToSsd)} to SSD, {Size(BytesToHdd)} to HDD), estimated {EstimatedDuration.TotalSeconds:F1} s.");
        foreach (var n in Notes)
        {
            sb.AppendLine("Note: " + n);
        }
        return sb.ToString();
    }

    /// <summary>
    /// The placement an image will have once the plan is applied: allocated extents inside a move take
    /// its tier, everything else stays (for a before/after picture of a plan not yet applied).
    /// </summary>
    /// <param name="image">The image's position among the plan's inputs.</param>
    /// <param name="placement">Its placement now (<see cref="QcowImage.GetPlacement"/>), in disk order.</param>
    /// <returns>The projected placement, in disk order, neighbours of one tier merged.</returns>
    public IReadOnlyList<TierExtent> ProjectPlacement(int image, IReadOnlyList<TierExtent> placement)
    {
        ArgumentNullException.ThrowIfNull(placement);
        ArgumentOutOfRangeException.ThrowIfNegative(image);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(image, ImageIds.Count);
        var moves = Moves.Where(m => m.Image == image).OrderBy(m => m.Start).ToList();
        var result = new List<TierExtent>(placement.Count + 2 * moves.Count);
        void Add(long start, long length, StorageTier? tier)
        {
            if (length <= 0)
            {
                return;
            }
            if (result.Count > 0 && result[^1].Tier == tier && result[^1].Start + result[^1].Length == start)
            {
                result[^1] = result[^1] with { Length = result[^1].Length + length };
                return;
            }
            result.Add(new TierExtent(start, length, tier));
        }
        var m = 0;
        foreach (var e in placement)
        {
            var pos = e.Start;
            var end = e.Start + e.Length;
            while (pos < end)
            {
                while (m < moves.Count && moves[m].Start + moves[m].Length <= pos)
                {
                    m++;
                }
                if (e.Tier is null || m == moves.Count || moves[m].Start >= end)
                {
                    Add(pos, end - pos, e.Tier);
                    break;
                }
                if (moves[m].Start > pos)
                {
                    Add(pos, moves[m].Start - pos, e.Tier);
                    pos = moves[m].Start;
                }
                var stop = Math.Min(end, moves[m].Start + moves[m].Length);
                Add(pos, stop - pos, moves[m].To);
                pos = stop;
            }
        }
        return result;
    }

    internal static string Size(long b) => b switch
    {
        >= 1L << 30 => $"{b / (double)(1L << 30):F2} GiB",
        >= 1L << 20 => $"{b / (double)(1L << 20):F1} MiB",
        >= 1L << 10 => $"{b / 1024.0:F0} KiB",
        _ => $"{b} B",
    };
}

/// <summary>Progress of an apply.</summary>
/// <param name="MovesDone">Moves completed.</param>
/// <param name="MovesTotal">Moves in the plan.</param>
/// <param name="BytesDone">Bytes copied so far.</param>
/// <param name="BytesTotal">Bytes the plan copies.</param>
public readonly record struct RebalanceProgress(int MovesDone, int MovesTotal, long BytesDone, long BytesTotal);

/// <summary>What an apply did.</summary>
/// <param name="MovesApplied">Moves completed.</param>
/// <param name="BytesMoved">Bytes copied.</param>
/// <param name="Elapsed">Wall-clock time.</param>
/// <param name="Cancelled">Whether it stopped early on cancellation (everything done so far stays done).</param>
public sealed record RebalanceResult(int MovesApplied, long BytesMoved, TimeSpan Elapsed, bool Cancelled);
