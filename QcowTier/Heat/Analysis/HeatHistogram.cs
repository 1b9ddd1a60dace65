namespace QcowTier.Heat.Analysis;

/// <summary>
/// How many units hold each (read code, write code) pair. A unit's counters are one byte each, so there are
/// at most 65536 distinct units as far as heat goes: analysing a map of any size takes one pass over its
/// pages and constant memory, and sorting the units by heat is sorting 65536 buckets.
/// </summary>
internal sealed class HeatHistogram
{
    public const int Buckets = 1 << 16;

    /// <summary>Units per bucket; index = read code &lt;&lt; 8 | write code.</summary>
    public long[] Units { get; } = new long[Buckets];

    public long Touched { get; private set; }

    /// <summary>Bucket indexes with units, hottest (by the map's score) first; equal scores by index.</summary>
    public int[] Order { get; private set; } = [];

    public double[] Score { get; } = new double[Buckets];

    public static long Reads(int bucket) => HeatCounter.Decode((byte)(bucket >> 8));

    public static long Writes(int bucket) => HeatCounter.Decode((byte)bucket);

    public static HeatHistogram Build(HeatMap map)
    {
        var h = new HeatHistogram();
        ForEachTouched(map, (_, r, w) => h.Units[(r << 8) | w]++);
        h.Rank(map);
        return h;
    }

    private void Rank(HeatMap map)
    {
        var used = new List<int>();
        for (var b = 1; b < Buckets; b++)
        {
            if (Units[b] == 0)
            {
                continue;
            }
            Touched += Units[b];
            Score[b] = map.ReadWeight * Reads(b) + map.WriteWeight * Writes(b);
            used.Add(b);
        }
        used.Sort((x, y) => Score[x] != Score[y] ? Score[y].CompareTo(Score[x]) : x.CompareTo(y));
        Order = used.ToArray();
    }

    /// <summary>Calls <paramref name="visit"/>(unit, read code, write code) for every touched unit in disk order.</summary>
    public static void ForEachTouched(HeatMap map, Action<long, int, int> visit)
    {
        var pages = map.Pages;
        var units = map.UnitCount;
        for (long p = 0; p < pages.Length; p++)
        {
            var page = pages[p];
            if (page is null)
            {
                continue;
            }
            for (var word = 0; word < HeatMap.PageUnits / 4; word++)
            {
                var rw = Volatile.Read(ref page.Reads[word]);
                var ww = Volatile.Read(ref page.Writes[word]);
                if ((rw | ww) == 0)
                {
                    continue;
                }
                for (var k = 0; k < 4; k++)
                {
                    var r = (rw >> (k * 8)) & 0xff;
                    var w = (ww >> (k * 8)) & 0xff;
                    var unit = (p << HeatMap.PageBits) + word * 4 + k;
                    if ((r | w) != 0 && unit < units)
                    {
                        visit(unit, r, w);
                    }
                }
            }
        }
    }

    /// <summary>Read and write operations served by the hottest <paramref name="units"/> units.</summary>
    /// <remarks>Sums are doubles: units × counts can pass 2^63 on absurdly large maps.</remarks>
    public (double Reads, double Writes) Served(long units)
    {
        double reads = 0, writes = 0;
        foreach (var b in Order)
        {
            if (units <= 0)
            {
                break;
            }
            var take = Math.Min(units, Units[b]);
            reads += (double)take * Reads(b);
            writes += (double)take * Writes(b);
            units -= take;
        }
        return (reads, writes);
    }

    public (double Reads, double Writes) Totals()
    {
        double reads = 0, writes = 0;
        foreach (var b in Order)
        {
            reads += (double)Units[b] * Reads(b);
            writes += (double)Units[b] * Writes(b);
        }
        return (reads, writes);
    }

    /// <summary>The fewest hottest units whose operations (reads, or reads and writes) reach <paramref name="target"/>.</summary>
    public long UnitsToServe(double target, bool readsOnly)
    {
        if (target <= 0)
        {
            return 0;
        }
        double served = 0;
        long units = 0;
        foreach (var b in Order)
        {
            long per = Reads(b) + (readsOnly ? 0 : Writes(b));
            if (per > 0 && served + (double)per * Units[b] >= target)
            {
                return units + (long)Math.Ceiling((target - served) / per - 1e-9);
            }
            served += (double)per * Units[b];
            units += Units[b];
        }
        return units;
    }
}
