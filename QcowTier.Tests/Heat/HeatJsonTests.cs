using System.Text.Json;
using CsCheck;

namespace QcowTier.Tests.Heat;

/// <summary>The JSON export, checked against HeatMap.Hottest, which sorts every touched unit.</summary>
public sealed class HeatJsonTests
{
    private static HeatUnit[] Parse(HeatMap map, int top = int.MaxValue)
    {
        var ms = new MemoryStream();
        HeatJson.Write(ms, map, top);
        using var doc = JsonDocument.Parse(ms.ToArray());
        doc.RootElement.ValueKind.Should().Be(JsonValueKind.Array);
        return doc.RootElement.EnumerateArray().Select(e =>
        {
            e.EnumerateObject().Select(p => p.Name).Should().Equal("start", "length", "reads", "writes", "score", "sequential");
            return new HeatUnit(e.GetProperty("start").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("reads").GetInt64(), e.GetProperty("writes").GetInt64(), e.GetProperty("score").GetDouble())
            {
                Sequential = e.TryGetProperty("sequential", out var q) ? q.GetInt64() : -1,
            };
        }).ToArray();
    }

    [Fact]
    public void Units_come_hottest_first_and_ties_by_offset()
    {
        var map = new HeatMap(10 * 4096 + 100, 4096);
        void Ops(int unit, int reads, int writes)
        {
            for (var i = 0; i < reads; i++)
            {
                map.RecordRead(unit * 4096L, 1);
            }
            for (var i = 0; i < writes; i++)
            {
                map.RecordWrite(unit * 4096L, 1);
            }
        }
        Ops(5, 3, 0);
        Ops(2, 1, 2);   // same score as unit 5: lower offset first
        Ops(7, 0, 9);
        Ops(10, 1, 0);  // the short last unit
        var units = Parse(map);
        units.Should().Equal(
            new HeatUnit(7 * 4096, 4096, 0, 9, 9),
            new HeatUnit(2 * 4096, 4096, 1, 2, 3),
            new HeatUnit(5 * 4096, 4096, 3, 0, 3),
            new HeatUnit(10 * 4096, 100, 1, 0, 1));
        units.Should().Equal(map.Hottest());
        Parse(map, 2).Should().Equal(map.Hottest(2));
        Parse(map, 0).Should().BeEmpty();
        Parse(new HeatMap(1 << 20, 4096)).Should().BeEmpty();
    }

    [Fact]
    public void Any_map_and_any_top_match_the_full_sort()
    {
        var gen = Gen.Select(Gen.Int[0, 40].Array[0, 300], Gen.Int[0, 40].Array[0, 300], Gen.Int[0, 320], Gen.Double[0, 3]);
        gen.Sample((reads, writes, top, writeWeight) =>
        {
            var map = new HeatMap(300 * 4096L, 4096) { WriteWeight = writeWeight };
            for (var u = 0; u < reads.Length; u++)
            {
                for (var i = 0; i < reads[u]; i++)
                {
                    map.RecordRead(u * 4096L, 4096);
                }
            }
            for (var u = 0; u < writes.Length; u++)
            {
                for (var i = 0; i < writes[u]; i++)
                {
                    map.RecordWrite(u * 4096L + 10, 10);
                }
            }
            Parse(map, top).Should().Equal(map.Hottest(top));
        }, iter: 150, threads: 1);
    }

    [Fact]
    public void Indented_output_is_the_same_json()
    {
        var map = HeatAnalysisTests.SmallMap();
        var compact = new MemoryStream();
        var indented = new MemoryStream();
        HeatJson.Write(compact, map);
        HeatJson.Write(indented, map, indented: true);
        indented.Length.Should().BeGreaterThan(compact.Length);
        using var a = JsonDocument.Parse(compact.ToArray());
        using var b = JsonDocument.Parse(indented.ToArray());
        JsonElement.DeepEquals(a.RootElement, b.RootElement).Should().BeTrue();
    }
}
