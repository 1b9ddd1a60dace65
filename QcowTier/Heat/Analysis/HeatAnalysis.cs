using System.Globalization;
using QcowTier.Heat.Analysis;

namespace QcowTier;

/// <summary>Whether a workload is skewed enough for heat-based tiering to pay.</summary>
public enum HeatSkewVerdict
{
    /// <summary>The map holds no reads or writes.</summary>
    NoActivity = 0,

    /// <summary>
    /// I/O is spread evenly: the hottest <see cref="HeatAnalysis.VerdictImageFraction"/> of the image serves less than
    /// <see cref="HeatAnalysis.VerdictMinimumShare"/> of it, or I/O is no more concentrated than chance would make an
    /// even workload of the same size (see <see cref="HeatSkewReport.HalfIoVersusChance"/>). An SSD tier then helps
    /// in proportion to its size and no more.
    /// </summary>
    NoSkew = 1,

    /// <summary>A small part of the image serves a large part of the I/O: worth placing on SSD.</summary>
    Skewed = 2,
}

/// <summary>The I/O served by the hottest part of an image.</summary>
/// <param name="ImageFraction">That part, as a fraction of the image (0.01 for the hottest 1 %).</param>
/// <param name="Bytes">Its size in bytes.</param>
/// <param name="ReadShare">Fraction of read operations it serves.</param>
/// <param name="WriteShare">Fraction of write operations it serves.</param>
/// <param name="IoShare">Fraction of all operations it serves.</param>
public readonly record struct HeatTopShare(double ImageFraction, long Bytes, double ReadShare, double WriteShare, double IoShare);

/// <summary>How much SSD, filled with the hottest units, serves a given share of the I/O.</summary>
/// <param name="Share">The share (0.9 for 90 %).</param>
/// <param name="BytesForReads">SSD bytes serving that share of reads.</param>
/// <param name="BytesForIo">SSD bytes serving that share of all operations.</param>
public readonly record struct HeatSsdNeed(double Share, long BytesForReads, long BytesForIo);

/// <summary>One point of the SSD-capacity curve.</summary>
/// <param name="CapacityFraction">SSD capacity as a fraction of the image.</param>
/// <param name="CapacityBytes">SSD capacity in bytes.</param>
/// <param name="ReadShare">Fraction of reads served when the hottest units fill that capacity.</param>
/// <param name="WriteShare">Fraction of writes served likewise.</param>
/// <param name="IoShare">Fraction of all operations served likewise.</param>
public readonly record struct HeatCapacityPoint(double CapacityFraction, long CapacityBytes, double ReadShare, double WriteShare, double IoShare);

/// <summary>How skewed the I/O of a heat map is, and how much SSD it is worth.</summary>
/// <remarks>
/// Units are ranked by <see cref="HeatUnit.Score"/> (the map's read and write weights), as the tiering does.
/// Shares count unit operations: an I/O spanning two units counts on both.
/// </remarks>
public sealed class HeatSkewReport
{
    internal HeatSkewReport() { }

    /// <summary>The disk's size in bytes.</summary>
    public long VirtualSize { get; internal init; }

    /// <summary>Bytes per unit of the map.</summary>
    public long UnitSize { get; internal init; }

    /// <summary>Units covering the disk.</summary>
    public long UnitCount { get; internal init; }

    /// <summary>Units with any activity.</summary>
    public long TouchedUnits { get; internal init; }

    /// <summary>Read operations summed over units (decayed counts).</summary>
    public double UnitReads { get; internal init; }

    /// <summary>Write operations summed over units (decayed counts).</summary>
    public double UnitWrites { get; internal init; }

    /// <summary>Shares served by the hottest 1, 5, 10 and 20 % of the image.</summary>
    public IReadOnlyList<HeatTopShare> Top { get; internal init; } = [];

    /// <summary>SSD needed to serve 50, 90 and 99 % of reads, and of all I/O.</summary>
    public IReadOnlyList<HeatSsdNeed> SsdNeeded { get; internal init; } = [];

    /// <summary>Share of I/O served as a function of SSD capacity, from 0 to 100 % of the image in even steps.</summary>
    public IReadOnlyList<HeatCapacityPoint> CapacityCurve { get; internal init; } = [];

    /// <summary>
    /// The units holding half of all I/O, divided by the units that would hold half if the same number of
    /// operations had fallen evenly at random (Poisson counts). Near 1 the map is as lumpy as chance makes
    /// it; the verdict wants at most <see cref="HeatAnalysis.VerdictMaximumChanceRatio"/>.
    /// </summary>
    public double HalfIoVersusChance { get; internal init; }

    /// <summary>Whether tiering by heat is worth it.</summary>
    public HeatSkewVerdict Verdict { get; internal init; }

    /// <summary>The verdict in a sentence, with the numbers behind it.</summary>
    public string VerdictReason { get; internal init; } = "";
}

/// <summary>Skew analysis of heat maps.</summary>
public static class HeatAnalysis
{
    /// <summary>The part of the image the verdict looks at: the hottest 20 %.</summary>
    public const double VerdictImageFraction = 0.20;

    /// <summary>Below this share of I/O served by <see cref="VerdictImageFraction"/> of the image, the verdict is <see cref="HeatSkewVerdict.NoSkew"/>.</summary>
    public const double VerdictMinimumShare = 0.30;

    /// <summary>
    /// Above this <see cref="HeatSkewReport.HalfIoVersusChance"/> the verdict is <see cref="HeatSkewVerdict.NoSkew"/>:
    /// the concentration could be chance (a short trace of even I/O is lumpy too).
    /// </summary>
    public const double VerdictMaximumChanceRatio = 0.5;

    private static readonly double[] TopFractions = [0.01, 0.05, 0.10, 0.20];
    private static readonly double[] NeedShares = [0.50, 0.90, 0.99];

    /// <summary>Analyses a map.</summary>
    /// <param name="map">The heat map; it is read, not changed.</param>
    /// <param name="curvePoints">Points of <see cref="HeatSkewReport.CapacityCurve"/> (at least 2). Default 201 (every 0.5 %).</param>
    /// <returns>The report.</returns>
    public static HeatSkewReport Analyze(HeatMap map, int curvePoints = 201)
    {
        ArgumentNullException.ThrowIfNull(map);
        var h = HeatHistogram.Build(map);
        var (reads, writes) = h.Totals();
        var top = TopFractions.Select(f =>
        {
            var k = (long)Math.Ceiling(f * map.UnitCount);
            var (r, w) = h.Served(k);
            return new HeatTopShare(f, Bytes(map, k), Share(r, reads), Share(w, writes), Share(r + w, reads + writes));
        }).ToArray();
        var need = NeedShares.Select(s => new HeatSsdNeed(
            s,
            Bytes(map, h.UnitsToServe(s * reads, readsOnly: true)),
            Bytes(map, h.UnitsToServe(s * (reads + writes), readsOnly: false)))).ToArray();
        var verdictShare = top.Single(t => t.ImageFraction == VerdictImageFraction).IoShare;
        var halfUnits = h.UnitsToServe(0.5 * (reads + writes), readsOnly: false);
        var chanceUnits = ChanceModel.UnitsForHalf(reads + writes, map.UnitCount) * map.UnitCount;
        var versusChance = reads + writes <= 0 ? 0 : halfUnits / Math.Max(chanceUnits, 1e-9);
        HeatSkewVerdict verdict;
        string reason;
        var inv = CultureInfo.InvariantCulture;
        if (reads + writes <= 0)
        {
            verdict = HeatSkewVerdict.NoActivity;
            reason = "the heat map holds no reads or writes";
        }
        else if (verdictShare < VerdictMinimumShare)
        {
            verdict = HeatSkewVerdict.NoSkew;
            reason = string.Format(inv, "the hottest {0:0}% of the image serves only {1:0.0}% of I/O (under {2:0}%): I/O is spread too evenly for tiering by heat to pay", VerdictImageFraction * 100, verdictShare * 100, VerdictMinimumShare * 100);
        }
        else if (versusChance > VerdictMaximumChanceRatio)
        {
            verdict = HeatSkewVerdict.NoSkew;
            reason = string.Format(inv, "half of the I/O sits on {0} units where even I/O of the same size would, by chance, use {1:0}: with {2:0.##} operations a unit on average this is no evidence of skew", halfUnits, chanceUnits, (reads + writes) / map.UnitCount);
        }
        else
        {
            verdict = HeatSkewVerdict.Skewed;
            reason = string.Format(inv, "the hottest {0:0}% of the image serves {1:0.0}% of I/O; half of it sits on {2} units, against {3:0} for even I/O of the same size", VerdictImageFraction * 100, verdictShare * 100, halfUnits, chanceUnits);
        }
        return new HeatSkewReport
        {
            VirtualSize = map.VirtualSize,
            UnitSize = map.UnitSize,
            UnitCount = map.UnitCount,
            TouchedUnits = h.Touched,
            UnitReads = reads,
            UnitWrites = writes,
            Top = top,
            SsdNeeded = need,
            CapacityCurve = Curve(map, h, curvePoints, reads, writes),
            HalfIoVersusChance = versusChance,
            Verdict = verdict,
            VerdictReason = reason,
        };
    }

    /// <summary>The SSD-capacity curve alone.</summary>
    /// <param name="map">The heat map.</param>
    /// <param name="points">Points from 0 to 100 % of the image in even steps (at least 2).</param>
    /// <returns>The curve.</returns>
    public static IReadOnlyList<HeatCapacityPoint> CapacityCurve(HeatMap map, int points = 201)
    {
        ArgumentNullException.ThrowIfNull(map);
        var h = HeatHistogram.Build(map);
        var (reads, writes) = h.Totals();
        return Curve(map, h, points, reads, writes);
    }

    private static HeatCapacityPoint[] Curve(HeatMap map, HeatHistogram h, int points, double reads, double writes)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(points, 2);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(points, 100_001);
        var curve = new HeatCapacityPoint[points];
        for (var i = 0; i < points; i++)
        {
            var f = (double)i / (points - 1);
            var k = (long)Math.Round(f * map.UnitCount);
            var (r, w) = h.Served(k);
            curve[i] = new HeatCapacityPoint(f, Bytes(map, k), Share(r, reads), Share(w, writes), Share(r + w, reads + writes));
        }
        return curve;
    }

    private static long Bytes(HeatMap map, long units) => units >= map.UnitCount ? map.VirtualSize : Math.Min(units * map.UnitSize, map.VirtualSize);

    private static double Share(double part, double total) => total > 0 ? Math.Min(1, part / total) : 0;
}
