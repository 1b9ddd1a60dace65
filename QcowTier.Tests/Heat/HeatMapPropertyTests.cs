using CsCheck;
using QcowTier.Heat;

namespace QcowTier.Tests.Heat;

/// <summary>Properties of heat map merging and decay, within the precision of the one-byte counters.</summary>
public sealed class HeatMapPropertyTests
{
    private const int Units = 48;
    private static readonly DateTimeOffset Moment = new(2024, 6, 1, 0, 0, 0, TimeSpan.Zero);

    /// <summary>Per-unit read and write operation counts, up to well past the exact range of 63.</summary>
    private static readonly Gen<(int[] Reads, int[] Writes)> Activity =
        Gen.Select(Gen.Int[0, 400].Array[Units], Gen.Int[0, 400].Array[Units]);

    private static HeatMap Build((int[] Reads, int[] Writes) activity)
    {
        var map = new HeatMap(Units * 4096L, 4096) { DecayedAt = Moment };
        for (var u = 0; u < Units; u++)
        {
            for (var i = 0; i < activity.Reads[u]; i++)
            {
                map.RecordRead(u * 4096L, 4096);
            }
            for (var i = 0; i < activity.Writes[u]; i++)
            {
                map.RecordWrite(u * 4096L, 100);
            }
        }
        map.DecayedAt = Moment; // recording does not move it; merging must not decay
        return map;
    }

    /// <summary>An exact copy (recording above 63 is random, so building twice would not be).</summary>
    private static HeatMap Copy(HeatMap source)
    {
        var map = new HeatMap(source.VirtualSize, source.ClusterSize) { DecayedAt = source.DecayedAt };
        for (long p = 0; p < source.Pages.Length; p++)
        {
            if (source.Pages[p] is { } page)
            {
                var dst = map.GetOrAddPage(p);
                page.Reads.CopyTo(dst.Reads, 0);
                page.Writes.CopyTo(dst.Writes, 0);
                (dst.ReadOps, dst.WriteOps, dst.ReadBytes, dst.WriteBytes) = (page.ReadOps, page.WriteOps, page.ReadBytes, page.WriteBytes);
            }
        }
        var (start, end) = source.WindowTicks;
        map.RestoreTotals(source.TotalReads, source.TotalWrites, source.TotalReadBytes, source.TotalWriteBytes, start, end);
        return map;
    }

    /// <summary>The two counter values around an exact sum: a merge must land on one of them.</summary>
    private static (long Low, long High) Bracket(long sum)
    {
        var code = HeatCounter.EncodeFloor(sum, out _, out var remainder);
        var low = HeatCounter.Decode(code);
        return remainder == 0 || code == HeatCounter.MaxCode ? (low, low) : (low, HeatCounter.Decode((byte)(code + 1)));
    }

    /// <summary>Distance between neighbouring counter values at a magnitude (0 in the exact range).</summary>
    private static long Gap(long value)
    {
        if (value < HeatCounter.ExactLimit)
        {
            return 0;
        }
        var code = HeatCounter.EncodeFloor(value, out _, out _);
        return code == HeatCounter.MaxCode ? 0 : HeatCounter.Decode((byte)(code + 1)) - HeatCounter.Decode(code);
    }

    [Fact]
    public void Merge_is_commutative_on_counts()
    {
        Gen.Select(Activity, Activity).Sample((a, b) =>
        {
            var mapA = Build(a);
            var mapB = Build(b);
            var ab = Copy(mapA);
            ab.Merge(Copy(mapB));
            var ba = Copy(mapB);
            ba.Merge(Copy(mapA));
            for (var u = 0; u < Units; u++)
            {
                foreach (var (sum, x, y, what) in new[]
                {
                    (mapA.GetUnit(u).Reads + mapB.GetUnit(u).Reads, ab.GetUnit(u).Reads, ba.GetUnit(u).Reads, "reads"),
                    (mapA.GetUnit(u).Writes + mapB.GetUnit(u).Writes, ab.GetUnit(u).Writes, ba.GetUnit(u).Writes, "writes"),
                })
                {
                    var (low, high) = Bracket(sum);
                    x.Should().BeInRange(low, high, $"A+B {what} of unit {u} rounds {sum} to a neighbouring counter value");
                    y.Should().BeInRange(low, high, $"B+A {what} of unit {u} rounds {sum} to a neighbouring counter value");
                }
            }
            ab.TotalReads.Should().Be(ba.TotalReads);
            ab.TotalWrites.Should().Be(mapA.TotalWrites + mapB.TotalWrites);
            ab.TotalWriteBytes.Should().Be(ba.TotalWriteBytes);
        }, iter: 60, threads: 1);
    }

    [Fact]
    public void Merge_is_associative_on_counts()
    {
        Gen.Select(Activity, Activity, Activity).Sample((a, b, c) =>
        {
            var (mapA, mapB, mapC) = (Build(a), Build(b), Build(c));
            var left = Copy(mapA);
            left.Merge(Copy(mapB));
            left.Merge(Copy(mapC));
            var bc = Copy(mapB);
            bc.Merge(Copy(mapC));
            var right = Copy(mapA);
            right.Merge(bc);
            for (var u = 0; u < Units; u++)
            {
                var reads = mapA.GetUnit(u).Reads + mapB.GetUnit(u).Reads + mapC.GetUnit(u).Reads;
                var writes = mapA.GetUnit(u).Writes + mapB.GetUnit(u).Writes + mapC.GetUnit(u).Writes;
                // Two roundings: the first under one step at the partial sum (at most the step at the whole),
                // the second under one step at a value that may have crossed into the next octave (two steps).
                var readTolerance = 3 * Gap(reads);
                var writeTolerance = 3 * Gap(writes);
                left.GetUnit(u).Reads.Should().BeInRange(reads - readTolerance, reads + readTolerance, $"(A+B)+C reads of unit {u}");
                right.GetUnit(u).Reads.Should().BeInRange(reads - readTolerance, reads + readTolerance, $"A+(B+C) reads of unit {u}");
                left.GetUnit(u).Writes.Should().BeInRange(writes - writeTolerance, writes + writeTolerance, $"(A+B)+C writes of unit {u}");
                right.GetUnit(u).Writes.Should().BeInRange(writes - writeTolerance, writes + writeTolerance, $"A+(B+C) writes of unit {u}");
                Math.Abs(left.GetUnit(u).Reads - right.GetUnit(u).Reads).Should().BeLessThanOrEqualTo(2 * readTolerance);
            }
            left.TotalReads.Should().Be(right.TotalReads);
            left.TotalReads.Should().Be(mapA.TotalReads + mapB.TotalReads + mapC.TotalReads);
        }, iter: 40, threads: 1);
    }

    [Fact]
    public void Merging_small_counts_is_exact()
    {
        Gen<(int[] Reads, int[] Writes)> small = Gen.Select(Gen.Int[0, 20].Array[Units], Gen.Int[0, 20].Array[Units]);
        Gen.Select(small, small, small).Sample((a, b, c) =>
        {
            var sum = Build(a);
            sum.Merge(Build(b));
            sum.Merge(Build(c));
            for (var u = 0; u < Units; u++)
            {
                sum.GetUnit(u).Reads.Should().Be(a.Reads[u] + b.Reads[u] + c.Reads[u]);
                sum.GetUnit(u).Writes.Should().Be(a.Writes[u] + b.Writes[u] + c.Writes[u]);
            }
        }, iter: 50, threads: 1);
    }

    [Fact]
    public void Decay_halves_counts_per_half_life_on_average()
    {
        var gen = Gen.Select(Gen.Int[1, 1500].Array[256], Gen.Int[1, 3]);
        double ratioSum = 0;
        var samples = 0;
        gen.Sample((counts, halfLives) =>
        {
            var map = new HeatMap(256 * 4096L, 4096, halfLife: TimeSpan.FromHours(6)) { DecayedAt = Moment };
            for (var u = 0; u < counts.Length; u++)
            {
                for (var i = 0; i < counts[u]; i++)
                {
                    map.RecordRead(u * 4096L, 1);
                }
            }
            var before = Enumerable.Range(0, 256).Select(u => map.GetUnit(u).Reads).ToArray();
            map.DecayTo(Moment + halfLives * map.HalfLife);
            var after = Enumerable.Range(0, 256).Select(u => map.GetUnit(u).Reads).ToArray();

            var expected = before.Sum() * Math.Pow(2, -halfLives);
            // Each unit is rounded twice at random, without bias: to a whole number, then to a neighbouring
            // counter value. Each rounding's variance is at most a quarter of its step squared.
            var sigma = Math.Sqrt(before.Sum(v => (1 + Math.Pow(Gap((long)Math.Ceiling(v * Math.Pow(2, -halfLives))), 2)) / 4.0));
            ((double)after.Sum()).Should().BeApproximately(expected, 6 * sigma + 1, $"{halfLives} half-lives");
            for (var u = 0; u < 256; u++)
            {
                var exact = before[u] * Math.Pow(2, -halfLives);
                var step = Math.Max(1, Gap((long)Math.Ceiling(exact)));
                ((double)after[u]).Should().BeApproximately(exact, 2 * step, $"unit {u} decays to a neighbouring counter value");
            }
            ratioSum += after.Sum() / expected;
            samples++;
        }, iter: 30, threads: 1);
        (ratioSum / samples).Should().BeApproximately(1, 0.01, "decay is unbiased across samples");
    }
}
