using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>Placement policy: default tier, SSD budget and pins decide where new clusters go, and persist.</summary>
public sealed class TierPolicyTests
{
    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    [InlineData(65536)]
    public void New_clusters_in_pinned_ranges_land_on_the_pinned_tier(int cs)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        long size = cs * 256L;
        var rng = new Random(cs);
        var model = new DiskModel(size, cs);
        // Pins: cluster-aligned and unaligned edges, against a default of HDD.
        var pins = new List<TierPin>
        {
            new(10L * cs, 20L * cs, StorageTier.Ssd),
            new(60L * cs + 100, 30L * cs, StorageTier.Ssd),
            new(120L * cs, 5L * cs, StorageTier.Hdd), // same as the default: a no-op, but it must be kept
            new(200L * cs + cs / 2, 7L * cs + 3, StorageTier.Ssd),
        };
        using (var img = QcowImage.Create(path, size, TierKit.Tiered(cs, defaultTier: StorageTier.Hdd)))
        {
            foreach (var p in pins)
            {
                img.PinTier(p.Start, p.Length, p.Tier);
            }
            img.GetTierPins().Should().Equal(pins);
        }
        using (var img = QcowImage.Open(path))
        {
            img.GetTierPins().Should().Equal(pins, "pins persist across reopen");
            // Fill the whole disk with unaligned writes in random order: allocations straddle pin edges.
            var chunk = cs * 3 + 777;
            var starts = new List<long>();
            for (long p = 0; p < size; p += chunk)
            {
                starts.Add(p);
            }
            foreach (var p in starts.OrderBy(_ => rng.Next()))
            {
                var data = TierKit.RandomBytes(rng, (int)Math.Min(chunk, size - p));
                img.Write(p, data);
                model.Write(p, data);
            }
            TierKit.AssertContent(img, model);
            var tiers = TierKit.ClusterTiers(img);
            for (var c = 0; c < tiers.Length; c++)
            {
                long start = (long)c * cs, end = start + cs;
                var covering = pins.Where(p => p.Start <= start && p.Start + p.Length >= end).ToList();
                var touching = pins.Any(p => p.Start < end && p.Start + p.Length > start);
                if (covering.Count == 1)
                {
                    tiers[c].Should().Be(covering[0].Tier, $"cluster {c} lies inside the pin {covering[0]}");
                }
                else if (!touching)
                {
                    tiers[c].Should().Be(StorageTier.Hdd, $"cluster {c} is outside every pin, so it goes to the default tier");
                }
            }
            TierKit.AssertUsageMatchesPlacement(img);

            // Pinning does not move existing clusters; MoveToTier does, and pinned new writes follow the pin.
            img.PinTier(150L * cs, 10L * cs, StorageTier.Ssd);
            TierKit.ClusterTiers(img).Skip(150).Take(10).Should().OnlyContain(t => t == StorageTier.Hdd);
            img.MoveToTier(150L * cs, 10L * cs, StorageTier.Ssd);
            TierKit.ClusterTiers(img).Skip(150).Take(10).Should().OnlyContain(t => t == StorageTier.Ssd);

            // Unpin a part of a pin: the rest stays, new clusters in the hole go to the default tier again.
            img.UnpinTier(15L * cs, 5L * cs);
            img.GetTierPins().Should().ContainInOrder(new TierPin(10L * cs, 5L * cs, StorageTier.Ssd), new TierPin(20L * cs, 10L * cs, StorageTier.Ssd));
            img.Discard(10L * cs, 20L * cs);
            model.Discard(10L * cs, 20L * cs);
            var again = TierKit.RandomBytes(rng, 20 * cs);
            img.Write(10L * cs, again);
            model.Write(10L * cs, again);
            var t2 = TierKit.ClusterTiers(img);
            t2.Skip(10).Take(5).Should().OnlyContain(t => t == StorageTier.Ssd);
            t2.Skip(15).Take(5).Should().OnlyContain(t => t == StorageTier.Hdd);
            t2.Skip(20).Take(10).Should().OnlyContain(t => t == StorageTier.Ssd);
            TierKit.AssertContent(img, model);
        }
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            img.GetTierPins().Should().Contain(new TierPin(150L * cs, 10L * cs, StorageTier.Ssd));
            img.GetTierPins().Should().NotContain(p => p.Start < 20L * cs && p.Start + p.Length > 15L * cs);
            TierKit.AssertContent(img, model);
            TierKit.AssertRefcounts(img);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    [Fact]
    public void Pin_on_ssd_wins_over_the_budget_and_budget_spills_the_rest()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const int cs = 4096;
        const long size = 1024 * cs;
        const long budget = 100 * cs;
        var rng = new Random(5);
        var model = new DiskModel(size, cs);
        using var img = QcowImage.Create(path, size, TierKit.Tiered(cs, ssdBudget: budget));
        img.PinTier(900L * cs, 124L * cs, StorageTier.Ssd);
        // Writes in random order outside the pin: SSD never exceeds the budget, HDD takes the rest.
        for (var i = 0; i < 300; i++)
        {
            var off = rng.NextInt64(880L * cs);
            var data = TierKit.RandomBytes(rng, rng.Next(1, 5 * cs));
            img.Write(off, data);
            model.Write(off, data);
            img.GetTierUsage().SsdBytes.Should().BeLessThanOrEqualTo(budget, $"after write {i}, no pin applies, so the budget holds");
        }
        var usage = TierKit.AssertUsageMatchesPlacement(img);
        usage.SsdBytes.Should().BeGreaterThan(budget / 2);
        usage.HddBytes.Should().BeGreaterThan(0);
        // The pinned range goes to SSD although the budget is spent.
        var pinned = TierKit.RandomBytes(rng, 124 * cs);
        img.Write(900L * cs, pinned);
        model.Write(900L * cs, pinned);
        TierKit.ClusterTiers(img).Skip(900).Should().OnlyContain(t => t == StorageTier.Ssd);
        img.GetTierUsage().SsdBytes.Should().BeGreaterThan(budget);
        TierKit.AssertContent(img, model);
    }

    [Fact]
    public void Set_tier_policy_changes_where_new_clusters_go_and_persists()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const int cs = 65536;
        const long size = 64L * cs;
        var model = new DiskModel(size, cs);
        var rng = new Random(9);

        void WriteClusters(QcowImage img, int first, int count)
        {
            var d = TierKit.RandomBytes(rng, count * cs);
            img.Write((long)first * cs, d);
            model.Write((long)first * cs, d);
        }

        using (var img = QcowImage.Create(path, size, TierKit.Tiered(cs)))
        {
            img.DefaultTier.Should().Be(StorageTier.Ssd);
            img.SsdBudget.Should().Be(0);
            WriteClusters(img, 0, 8);
            img.SetTierPolicy(StorageTier.Hdd, 0);
            img.DefaultTier.Should().Be(StorageTier.Hdd);
            WriteClusters(img, 8, 8);
        }
        using (var img = QcowImage.Open(path))
        {
            img.DefaultTier.Should().Be(StorageTier.Hdd, "the policy persists");
            WriteClusters(img, 16, 8);
            img.SetTierPolicy(StorageTier.Ssd, 20L * cs);
        }
        using (var img = QcowImage.Open(path))
        {
            img.DefaultTier.Should().Be(StorageTier.Ssd);
            img.SsdBudget.Should().Be(20L * cs);
            // 8 SSD clusters so far: 12 more fit, one at a time.
            for (var c = 24; c < 48; c++)
            {
                WriteClusters(img, c, 1);
            }
            var tiers = TierKit.ClusterTiers(img);
            tiers.Take(8).Should().OnlyContain(t => t == StorageTier.Ssd);
            tiers.Skip(8).Take(16).Should().OnlyContain(t => t == StorageTier.Hdd);
            tiers.Skip(24).Take(12).Should().OnlyContain(t => t == StorageTier.Ssd);
            tiers.Skip(36).Take(12).Should().OnlyContain(t => t == StorageTier.Hdd);
            var usage = TierKit.AssertUsageMatchesPlacement(img);
            usage.Should().Be(new TierUsage(20L * cs, 28L * cs));
            // Budget 0 means no limit.
            img.SetTierPolicy(StorageTier.Ssd, 0);
            WriteClusters(img, 48, 8);
            TierKit.ClusterTiers(img).Skip(48).Take(8).Should().OnlyContain(t => t == StorageTier.Ssd);
            var act = () => img.SetTierPolicy(StorageTier.Ssd, -1);
            act.Should().Throw<ArgumentOutOfRangeException>();
        }
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            img.SsdBudget.Should().Be(0);
            img.DefaultTier.Should().Be(StorageTier.Ssd);
            TierKit.AssertContent(img, model);
            TierKit.AssertUsageMatchesPlacement(img).Should().Be(new TierUsage(28L * cs, 28L * cs));
        }
    }

    [Fact]
    public void Many_pins_persist_and_unpinning_everything_removes_the_table()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const int cs = 512;
        var expected = new List<TierPin>();
        using (var img = QcowImage.Create(path, 64 << 20, TierKit.Tiered(cs)))
        {
            // More pins than fit in one cluster of the hints table (512 / 24 = 21 per cluster).
            for (var i = 0; i < 100; i++)
            {
                var pin = new TierPin(i * 100_000L, 50_000 + i, i % 3 == 0 ? StorageTier.Ssd : StorageTier.Hdd);
                img.PinTier(pin.Start, pin.Length, pin.Tier);
                expected.Add(pin);
            }
            // Touching pins of one tier merge (pin 3 is SSD, pin 4 HDD: only pin 3 grows).
            img.PinTier(350_003, 49_997, StorageTier.Ssd);
            expected[3] = new TierPin(300_000, 100_000, StorageTier.Ssd);
            img.GetTierPins().Should().Equal(expected);
        }
        using (var img = QcowImage.Open(path))
        {
            img.GetTierPins().Should().Equal(expected);
            TierKit.AssertRefcounts(img, because: "after 101 hints tables were written and all but the last freed");
            img.UnpinTier(0, img.Size);
            img.GetTierPins().Should().BeEmpty();
        }
        using (var img = QcowImage.Open(path))
        {
            img.GetTierPins().Should().BeEmpty();
            img.DetachTier();
        }
        // Every old hints table was freed: QEMU finds no leaks.
        Qemu.AssertClean(path);
    }

    /// <summary>
    /// The per-tier counts are taken lazily (first use walks the L2 tables). Taking them while a write
    /// allocation or a move batch is in flight must not lose that allocation from the counts.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Usage_first_counted_while_an_allocation_is_in_flight_stays_exact(bool move)
    {
        using var dir = new TempDir();
        const int cs = 4096;
        const long size = 1 << 20;
        var disks = new TierDisks(dir.File("img.qcow2"));
        var model = new DiskModel(size, cs);
        var rng = new Random(move ? 1 : 2);
        using (var img = disks.Create(size, TierKit.Tiered(cs, defaultTier: StorageTier.Hdd)))
        {
            var d = TierKit.RandomBytes(rng, 64 << 10);
            img.Write(0, d);
            model.Write(0, d);
            img.MoveToTier(0, 64 << 10, StorageTier.Ssd);
        }
        var hdd = Path.Combine(dir.Path, "data.hdd");
        using var gate = new ManualResetEventSlim(false);
        using var parked = new ManualResetEventSlim(false);
        using var image = disks.Open(readOnly: false); // fresh: nothing counted yet
        disks.Line.BeforeWriteHook = (name, _, _) =>
        {
            if (name == hdd && !parked.IsSet)
            {
                parked.Set();
                gate.Wait();
            }
        };
        var data = TierKit.RandomBytes(rng, 3 * cs);
        var op = Task.Run(() =>
        {
            if (move)
            {
                image.MoveToTier(0, 64 << 10, StorageTier.Hdd);
            }
            else
            {
                image.Write(512 << 10, data);
            }
        });
        parked.Wait(TimeSpan.FromSeconds(60)).Should().BeTrue("the operation reaches its HDD data write");
        var during = image.GetTierUsage(); // the first count, taken while the allocation is in flight
        gate.Set();
        await op;
        disks.Line.BeforeWriteHook = null;
        if (!move)
        {
            model.Write(512 << 10, data);
        }
        TierKit.AssertContent(image, model);
        var usage = TierKit.AssertUsageMatchesPlacement(image, $"(counts first taken in flight: {during})");
        usage.Should().Be(move ? new TierUsage(0, 64 << 10) : new TierUsage(64 << 10, 3 * cs));
    }
}
