using System.Text.Json;
using QcowTier.Heat.Analysis;

namespace QcowTier;

/// <summary>JSON export of heat maps.</summary>
public static class HeatJson
{
    /// <summary>
    /// Writes the touched units as a JSON array, hottest first (ties: lower offset first), each an object
    /// <c>{"start": guest byte, "length": bytes, "reads": operations, "writes": operations, "score": heat,
    /// "sequential": operations that continued a stream}</c>.
    /// </summary>
    /// <param name="output">Receives UTF-8 JSON.</param>
    /// <param name="map">The heat map; it is read, not changed.</param>
    /// <param name="top">At most this many units; memory use is proportional to it, not to the map.</param>
    /// <param name="indented">Indent the output.</param>
    public static void Write(Stream output, HeatMap map, int top = int.MaxValue, bool indented = false)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(map);
        ArgumentOutOfRangeException.ThrowIfNegative(top);
        var h = HeatHistogram.Build(map);
        var units = Select(map, h, (int)Math.Min(top, Math.Min(h.Touched, Array.MaxLength)));
        using var w = new Utf8JsonWriter(output, new JsonWriterOptions { Indented = indented });
        w.WriteStartArray();
        foreach (var u in units)
        {
            var unit = map.GetUnit(u);
            w.WriteStartObject();
            w.WriteNumber("start"u8, unit.Start);
            w.WriteNumber("length"u8, unit.Length);
            w.WriteNumber("reads"u8, unit.Reads);
            w.WriteNumber("writes"u8, unit.Writes);
            w.WriteNumber("score"u8, unit.Score);
            w.WriteNumber("sequential"u8, unit.Sequential);
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }

    /// <summary>
    /// The indexes of the <paramref name="count"/> hottest units in order, without sorting the whole map:
    /// the histogram gives the score rank below which fewer than <paramref name="count"/> units lie, so one
    /// pass collects exactly those plus the first units (in disk order) of the boundary rank.
    /// </summary>
    internal static long[] Select(HeatMap map, HeatHistogram h, int count)
    {
        if (count <= 0)
        {
            return [];
        }
        // Rank of each bucket: buckets of equal score share a rank, so ties order by offset alone.
        // Buckets the histogram did not see (units heated while we scan: the map records concurrently)
        // rank last, so they can never push out a unit the first pass counted.
        var rank = new int[HeatHistogram.Buckets];
        Array.Fill(rank, int.MaxValue);
        var ranks = 0;
        double last = double.NaN;
        var unitsAtRank = new List<long>();
        foreach (var b in h.Order)
        {
            if (h.Score[b] != last)
            {
                ranks++;
                unitsAtRank.Add(0);
                last = h.Score[b];
            }
            rank[b] = ranks - 1;
            unitsAtRank[ranks - 1] += h.Units[b];
        }
        long below = 0;
        var boundary = 0;
        while (boundary < ranks && below + unitsAtRank[boundary] < count)
        {
            below += unitsAtRank[boundary];
            boundary++;
        }
        var fromBoundary = count - below;
        var keys = new long[count];
        var n = 0;
        HeatHistogram.ForEachTouched(map, (unit, r, w) =>
        {
            var k = rank[(r << 8) | w];
            if (n < keys.Length && (k < boundary || (k == boundary && fromBoundary-- > 0)))
            {
                keys[n++] = ((long)k << 40) | unit; // units < 2^36, ranks < 2^16
            }
        });
        Array.Sort(keys, 0, n);
        var result = new long[n];
        for (var i = 0; i < n; i++)
        {
            result[i] = keys[i] & ((1L << 40) - 1);
        }
        return result;
    }
}
