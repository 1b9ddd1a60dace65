using QcowTier.Heat.Analysis;

namespace QcowTier.Tests.Heat;

/// <summary>The skew report on a small map worked out by hand, and on synthetic Zipf and uniform workloads.</summary>
public sealed class HeatAnalysisTests
{
    /// <summary>Ten 4 KiB units: unit 0 read 10 times, unit 1 written 30 times, unit 2 read and written 4 times each.</summary>
    internal static HeatMap SmallMap()
    {
        var map = new HeatMap(10 * 4096, 4096);
        for (var i = 0; i < 10; i++)
        {
            map.RecordRead(0, 4096);
        }
        for (var i = 0; i < 30; i++)
        {
            map.RecordWrite(4096, 4096);
        }
        for (var i = 0; i < 4; i++)
        {
            map.RecordRead(8192, 512);
            map.RecordWrite(8192, 512);
        }
        return map;
    }

    [Fact]
    public void A_small_map_gives_the_shares_worked_out_by_hand()
    {
        var r = HeatAnalysis.Analyze(SmallMap(), curvePoints: 11);

        r.UnitCount.Should().Be(10);
        r.TouchedUnits.Should().Be(3);
        r.UnitReads.Should().Be(14);
        r.UnitWrites.Should().Be(34);
        // Ranked by score: unit 1 (30), unit 0 (10), unit 2 (8). 1 %, 5 % and 10 % of ten units are one unit.
        r.Top.Select(t => t.ImageFraction).Should().Equal(0.01, 0.05, 0.10, 0.20);
        r.Top.Take(3).Should().AllBeEquivalentTo(new HeatTopShare(0, 4096, 0, 30 / 34.0, 30 / 48.0), o => o.Excluding(t => t.ImageFraction));
        r.Top[3].Should().Be(new HeatTopShare(0.20, 8192, 10 / 14.0, 30 / 34.0, 40 / 48.0));
        r.SsdNeeded.Should().Equal(
            new HeatSsdNeed(0.50, 8192, 4096),    // 7 reads need units 1 and 0; 24 operations need unit 1
            new HeatSsdNeed(0.90, 12288, 12288),  // 12.6 reads and 43.2 operations need all three
            new HeatSsdNeed(0.99, 12288, 12288));
        r.CapacityCurve.Select(p => p.IoShare).Should().Equal(0, 30 / 48.0, 40 / 48.0, 1, 1, 1, 1, 1, 1, 1, 1);
        r.CapacityCurve.Select(p => p.CapacityBytes).Should().Equal(Enumerable.Range(0, 11).Select(i => i * 4096L));
        r.CapacityCurve[1].ReadShare.Should().Be(0);
        r.CapacityCurve[2].ReadShare.Should().Be(10 / 14.0);
        r.Verdict.Should().Be(HeatSkewVerdict.Skewed);
        r.VerdictReason.Should().Contain("83.3%");
    }

    [Fact]
    public void Weights_change_the_ranking()
    {
        var map = SmallMap();
        map.WriteWeight = 0;
        var r = HeatAnalysis.Analyze(map, curvePoints: 11);
        // By reads alone: unit 0 (10), unit 2 (4), unit 1 (0).
        r.Top[0].Should().Be(new HeatTopShare(0.01, 4096, 10 / 14.0, 0, 10 / 48.0));
        r.Top[3].Should().Be(new HeatTopShare(0.20, 8192, 1, 4 / 34.0, 18 / 48.0));
        r.SsdNeeded[0].BytesForReads.Should().Be(4096);
    }

    [Fact]
    public void An_empty_map_has_no_activity()
    {
        var r = HeatAnalysis.Analyze(new HeatMap(1 << 20, 4096));
        r.Verdict.Should().Be(HeatSkewVerdict.NoActivity);
        r.Top.Should().OnlyContain(t => t.IoShare == 0);
        r.SsdNeeded.Should().OnlyContain(n => n.BytesForReads == 0 && n.BytesForIo == 0);
        r.CapacityCurve.Should().HaveCount(201);
    }

    private const int ZipfUnits = 1024;
    private const double ZipfExponent = 1.1;

    /// <summary>100 000 I/Os whose unit follows Zipf's law over a shuffled order of the units; 80 % reads.</summary>
    internal static HeatMap ZipfMap(int seed)
    {
        var map = new HeatMap(ZipfUnits * 65536L, 65536);
        var rng = new Random(seed);
        var order = Enumerable.Range(0, ZipfUnits).OrderBy(_ => rng.Next()).ToArray();
        var cdf = new double[ZipfUnits];
        double acc = 0;
        for (var i = 0; i < ZipfUnits; i++)
        {
            acc += Math.Pow(i + 1, -ZipfExponent);
            cdf[i] = acc;
        }
        for (var n = 0; n < 100_000; n++)
        {
            var x = rng.NextDouble() * acc;
            var rank = Array.BinarySearch(cdf, x);
            rank = rank < 0 ? ~rank : rank;
            map.Record(rng.NextDouble() >= 0.8, order[Math.Min(rank, ZipfUnits - 1)] * 65536L + rng.Next(0, 15) * 4096, 4096, null);
        }
        return map;
    }

    private static double ZipfShare(int ranks)
    {
        double top = 0, all = 0;
        for (var i = 1; i <= ZipfUnits; i++)
        {
            var p = Math.Pow(i, -ZipfExponent);
            all += p;
            if (i <= ranks)
            {
                top += p;
            }
        }
        return top / all;
    }

    [Fact]
    public void A_zipf_workload_is_skewed_as_zipf_predicts()
    {
        var map = ZipfMap(1);
        var r = HeatAnalysis.Analyze(map);

        r.Verdict.Should().Be(HeatSkewVerdict.Skewed);
        // Exactly what the map's own ranking (HeatMap.Hottest) gives ...
        var hottest = map.Hottest();
        var all = hottest.Sum(u => u.Reads + u.Writes);
        foreach (var t in r.Top)
        {
            var units = (int)Math.Ceiling(t.ImageFraction * ZipfUnits);
            t.IoShare.Should().BeApproximately(hottest.Take(units).Sum(u => u.Reads + u.Writes) / (double)all, 1e-12);
            t.Bytes.Should().Be(units * 65536L);
            // ... and close to Zipf's law, give or take the sampling and the counters' rounding (hot units
            // are counted to a few per cent, each rounding unbiased).
            t.IoShare.Should().BeApproximately(ZipfShare(units), 0.06, $"the hottest {t.ImageFraction:P0} of the image");
        }
        r.Top[3].IoShare.Should().BeGreaterThan(0.7);
        var halfUnits = Enumerable.Range(1, ZipfUnits).First(k => ZipfShare(k) >= 0.5);
        r.SsdNeeded[0].BytesForReads.Should().BeInRange((long)(halfUnits * 0.5) * 65536, (long)(halfUnits * 2.0) * 65536);
        r.SsdNeeded[0].BytesForReads.Should().BeLessThan(r.VirtualSize / 10, "half the reads live in a small corner of the disk");
        r.CapacityCurve.Select(p => p.IoShare).Should().BeInAscendingOrder();
        r.CapacityCurve[^1].IoShare.Should().Be(1);
    }

    [Fact]
    public void A_uniform_workload_has_no_skew()
    {
        var map = new HeatMap(ZipfUnits * 65536L, 65536);
        for (var u = 0; u < ZipfUnits; u++)
        {
            for (var i = 0; i < 10; i++)
            {
                map.RecordRead(u * 65536L, 4096);
            }
            map.RecordWrite(u * 65536L, 4096);
            map.RecordWrite(u * 65536L + 8192, 4096);
        }
        var r = HeatAnalysis.Analyze(map);

        r.Verdict.Should().Be(HeatSkewVerdict.NoSkew);
        r.VerdictReason.Should().Contain("20.0%");
        r.Top.Select(t => t.IoShare).Should().Equal(11 / 1024.0, 52 / 1024.0, 103 / 1024.0, 205 / 1024.0);
        r.SsdNeeded.Select(n => n.BytesForReads).Should().Equal(512 * 65536L, 922 * 65536L, 1014 * 65536L);
        r.CapacityCurve.Should().OnlyContain(p => Math.Abs(p.IoShare - p.CapacityFraction) <= 0.5 / ZipfUnits + 1e-12, "serving grows in proportion to capacity");
    }

    [Fact]
    public void Random_uniform_io_has_no_skew_and_zipf_of_several_seeds_has()
    {
        var rng = new Random(5);
        var uniform = new HeatMap(ZipfUnits * 65536L, 65536);
        // About 40 operations a unit: exact counters, so only the sampling spreads the units.
        for (var n = 0; n < 40_000; n++)
        {
            uniform.Record(rng.Next(2) == 0, rng.Next(ZipfUnits) * 65536L, 4096, null);
        }
        var u = HeatAnalysis.Analyze(uniform);
        u.Verdict.Should().Be(HeatSkewVerdict.NoSkew);
        u.Top[3].IoShare.Should().BeInRange(0.2, HeatAnalysis.VerdictMinimumShare);

        foreach (var seed in new[] { 2, 3 })
        {
            HeatAnalysis.Analyze(ZipfMap(seed)).Verdict.Should().Be(HeatSkewVerdict.Skewed);
        }
    }

    [Theory]
    [InlineData(0.01)]
    [InlineData(1)]
    [InlineData(7.6)]
    [InlineData(60)]
    [InlineData(1500)]
    public void The_chance_model_matches_a_simulation_of_even_io(double lambda)
    {
        const int units = 20_000;
        var rng = new Random(11);
        var counts = new int[units];
        var ops = (long)(lambda * units);
        for (long i = 0; i < ops; i++)
        {
            counts[rng.Next(units)]++;
        }
        Array.Sort(counts);
        Array.Reverse(counts);
        long held = 0;
        var k = 0;
        while (held < ops / 2.0)
        {
            held += counts[k++];
        }
        var simulated = k / (double)units;
        ChanceModel.UnitsForHalf(ops, units).Should().BeApproximately(simulated, simulated * 0.03 + 2.0 / units);
    }

    [Fact]
    public void A_short_trace_of_even_io_is_not_called_skewed_even_when_its_top_fifth_looks_busy()
    {
        // About 7.6 operations a unit at random: the hottest fifth holds some 30 % by chance alone.
        var rng = new Random(12);
        var map = new HeatMap(1024 * 65536L, 65536);
        for (var i = 0; i < 7800; i++)
        {
            map.RecordRead(rng.Next(1024) * 65536L, 4096);
        }
        var r = HeatAnalysis.Analyze(map);
        r.Verdict.Should().Be(HeatSkewVerdict.NoSkew);
        r.HalfIoVersusChance.Should().BeInRange(0.8, 1.2);

        // A thousand operations on a million units fill far less than a fifth of them: the top fifth holds
        // everything, which says nothing.
        var sparse = new HeatMap(1L << 32, 4096);
        for (var i = 0; i < 1000; i++)
        {
            sparse.RecordRead(rng.NextInt64(1L << 20) * 4096, 4096);
        }
        var s = HeatAnalysis.Analyze(sparse);
        s.Top[3].IoShare.Should().Be(1);
        s.Verdict.Should().Be(HeatSkewVerdict.NoSkew);
        s.VerdictReason.Should().Contain("no evidence");
    }

    [Fact]
    public void Concentrated_io_is_skewed_however_short_the_trace()
    {
        var rng = new Random(13);
        var tenUnits = new HeatMap(1L << 32, 4096);
        for (var i = 0; i < 1000; i++)
        {
            tenUnits.RecordRead(rng.Next(10) * 4096L * 1000, 4096);
        }
        var r = HeatAnalysis.Analyze(tenUnits);
        r.Verdict.Should().Be(HeatSkewVerdict.Skewed);
        r.HalfIoVersusChance.Should().BeLessThan(0.05, "5 units hold what 500 would by chance");

        // Even I/O on a tenth of the disk: that tenth belongs on SSD.
        var region = new HeatMap(1024 * 65536L, 65536);
        for (var i = 0; i < 5000; i++)
        {
            region.RecordWrite(rng.Next(102) * 65536L, 4096);
        }
        var g = HeatAnalysis.Analyze(region);
        g.Verdict.Should().Be(HeatSkewVerdict.Skewed);
        g.Top[3].IoShare.Should().Be(1);
    }

    [Fact]
    public void The_capacity_curve_alone_matches_the_report()
    {
        var map = ZipfMap(4);
        HeatAnalysis.CapacityCurve(map, 51).Should().Equal(HeatAnalysis.Analyze(map, 51).CapacityCurve);
        var act = () => HeatAnalysis.CapacityCurve(map, 1);
        act.Should().Throw<ArgumentOutOfRangeException>();
    }
}
