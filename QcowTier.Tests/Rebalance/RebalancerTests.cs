using CsCheck;
using QcowTier.Storage;
using QcowTier.Tests.Crash;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Rebalance;

public sealed class RebalancerTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private const long Size = 64L << 20;
    private const int Cluster = 65536;

    /// <summary>A tiered image with every cluster written (all on HDD) and the model of its content.</summary>
    private (QcowImage Image, byte[] Model) Filled(string name, StorageTier defaultTier = StorageTier.Hdd, long size = Size, int clusterSize = Cluster)
    {
        var image = QcowImage.Create(_dir.File(name + ".qcow2"), size, new QcowCreateOptions
        {
            ClusterSize = clusterSize,
            Tier = new QcowTierOptions { DataFile = name + ".hdd", DefaultTier = defaultTier },
        });
        var model = new byte[size];
        new Random(name.GetHashCode(StringComparison.Ordinal)).NextBytes(model);
        image.Write(0, model);
        image.Flush();
        return (image, model);
    }

    /// <summary>Reads that follow a steep power law over the clusters: cluster 0 hottest.</summary>
    private static HeatMap Skewed(QcowImage image, int ops = 50_000, int seed = 1)
    {
        var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
        var rnd = new Random(seed);
        var clusters = image.Size / image.ClusterSize;
        for (var i = 0; i < ops; i++)
        {
            var c = (long)(clusters * Math.Pow(rnd.NextDouble(), 8));
            heat.RecordRead(c * image.ClusterSize, 4096);
        }
        return heat;
    }

    private static void AssertContent(QcowImage image, byte[] model)
    {
        var all = new byte[model.Length];
        image.Read(0, all);
        all.AsSpan().SequenceEqual(model).Should().BeTrue("rebalancing never changes what the guest reads");
    }

    [Fact]
    public void Hot_clusters_move_to_ssd_within_budget_and_content_is_unchanged()
    {
        var (image, model) = Filled("a");
        using (image)
        {
            var heat = Skewed(image);
            var policy = new RebalancePolicy { SsdBudgetPercent = 10 };
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], policy);

            plan.WorthActing.Should().BeTrue();
            plan.Moves.Should().NotBeEmpty();
            plan.After.ReadShare.Should().BeGreaterThan(plan.Before.ReadShare);
            plan.Explain().Should().Contain("Reads served by SSD");
            plan.Moves.Should().OnlyContain(m => m.Cost > TimeSpan.Zero && (m.To == StorageTier.Ssd ? m.Benefit > TimeSpan.Zero : m.Benefit <= TimeSpan.Zero));
            plan.EstimatedDuration.Should().BeCloseTo(TimeSpan.FromTicks(plan.Moves.Sum(m => m.Cost.Ticks)), TimeSpan.FromMilliseconds(1));

            var result = Rebalancer.Apply(plan, [image]);
            result.Cancelled.Should().BeFalse();
            result.BytesMoved.Should().Be(plan.BytesToSsd + plan.BytesToHdd);

            var usage = image.GetTierUsage();
            usage.SsdBytes.Should().BeLessThanOrEqualTo(Size / 10);
            usage.SsdBytes.Should().BeGreaterThan(0);

            // The hottest cluster of all is now on SSD.
            var hottest = heat.Hottest(1)[0];
            image.GetPlacement(hottest.Start, Cluster).Should().ContainSingle().Which.Tier.Should().Be(StorageTier.Ssd);
            AssertContent(image, model);
        }
    }

    [Fact]
    public void Running_twice_on_the_same_heat_moves_nothing()
    {
        var (image, _) = Filled("b");
        using (image)
        {
            var heat = Skewed(image);
            var policy = new RebalancePolicy { SsdBudgetPercent = 20 };
            Rebalancer.Apply(Rebalancer.Plan([new RebalanceInput(image, heat)], policy), [image]);
            var again = Rebalancer.Plan([new RebalanceInput(image, heat)], policy);
            again.Moves.Should().BeEmpty("hysteresis keeps a settled placement settled");
        }
    }

    [Fact]
    public void A_workload_without_skew_gets_a_verdict_and_no_promotions()
    {
        var (image, _) = Filled("c");
        using (image)
        {
            var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
            var rnd = new Random(3);
            for (var i = 0; i < 50_000; i++)
            {
                heat.RecordRead(rnd.NextInt64(0, image.Size - 4096), 4096);
            }
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
            plan.WorthActing.Should().BeFalse();
            plan.BytesToSsd.Should().Be(0);
            plan.Explain().Should().Contain("no skew");
        }
    }

    [Fact]
    public void Pins_win_over_heat()
    {
        var (image, model) = Filled("d");
        using (image)
        {
            image.PinTier(0, 4 * Cluster, StorageTier.Hdd); // the hottest clusters, pinned to HDD
            var heat = Skewed(image);
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
            plan.Moves.Should().NotContain(m => m.Start < 4 * Cluster);
            Rebalancer.Apply(plan, [image]);
            image.GetPlacement(0, 4 * Cluster).Should().OnlyContain(e => e.Tier == StorageTier.Hdd);
            AssertContent(image, model);
        }
    }

    [Fact]
    public void The_move_cap_limits_bytes_per_run_and_a_later_run_continues()
    {
        var (image, model) = Filled("e");
        using (image)
        {
            var heat = Skewed(image);
            var capped = new RebalancePolicy { SsdBudgetPercent = 20, MaxMoveBytes = 2L << 20 };
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], capped);
            (plan.BytesToSsd + plan.BytesToHdd).Should().BeLessThanOrEqualTo(2L << 20);
            plan.Notes.Should().Contain(n => n.Contains("move cap", StringComparison.Ordinal));
            Rebalancer.Apply(plan, [image]);
            var next = Rebalancer.Plan([new RebalanceInput(image, heat)], capped);
            next.BytesToSsd.Should().BeGreaterThan(0, "the rest of the hot data follows in the next run");
            AssertContent(image, model);
        }
    }

    [Fact]
    public void Over_budget_ssd_is_demoted_coldest_first()
    {
        var (image, model) = Filled("f", StorageTier.Ssd);
        using (image)
        {
            image.GetTierUsage().HddBytes.Should().Be(0);
            var heat = Skewed(image);
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetPercent = 25 });
            plan.BytesToHdd.Should().BeGreaterThan(0);
            Rebalancer.Apply(plan, [image]);
            image.GetTierUsage().SsdBytes.Should().BeLessThanOrEqualTo(Size / 4);
            image.GetPlacement(0, Cluster).Should().ContainSingle().Which.Tier.Should().Be(StorageTier.Ssd, "the hottest cluster stays");
            AssertContent(image, model);
        }
    }

    [Fact]
    public void A_shared_budget_ranks_two_images_together()
    {
        var (hot, hotModel) = Filled("g1");
        var (cold, coldModel) = Filled("g2");
        using (hot)
        using (cold)
        {
            var hotHeat = Skewed(hot, ops: 100_000);
            var coldHeat = new HeatMap(cold.Size, cold.ClusterSize, imageId: cold.HeatIdentity);
            coldHeat.RecordRead(0, 4096);
            var budget = 4L << 20;
            var plan = Rebalancer.Plan([new RebalanceInput(hot, hotHeat), new RebalanceInput(cold, coldHeat)],
                new RebalancePolicy { SsdBudgetBytes = budget, SharedBudget = true });
            plan.Moves.Should().OnlyContain(m => m.Image == 0, "the other image's single read is not worth SSD space");
            Rebalancer.Apply(plan, [hot, cold]);
            (hot.GetTierUsage().SsdBytes + cold.GetTierUsage().SsdBytes).Should().BeLessThanOrEqualTo(budget);
            AssertContent(hot, hotModel);
            AssertContent(cold, coldModel);
        }
    }

    [Fact]
    public void A_heat_map_of_another_image_is_refused()
    {
        var (a, _) = Filled("h1");
        var (b, _) = Filled("h2");
        using (a)
        using (b)
        {
            var heat = Skewed(b);
            var act = () => Rebalancer.Plan([new RebalanceInput(a, heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
            act.Should().Throw<ArgumentException>().WithMessage("*belongs to image*");
        }
    }

    [Fact]
    public void Cancelling_an_apply_leaves_a_consistent_image_and_planning_again_resumes()
    {
        // Small clusters, so the plan takes several batches of 1024 clusters and can stop between them.
        var (image, model) = Filled("i", clusterSize: 4096);
        using (image)
        {
            var heat = Skewed(image, ops: 200_000);
            var policy = new RebalancePolicy { SsdBudgetPercent = 20 };
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], policy);
            plan.BytesToSsd.Should().BeGreaterThan(2048L * 4096);
            using var cts = new CancellationTokenSource();
            var progress = new SyncProgress(p =>
            {
                if (p.BytesDone > 0)
                {
                    cts.Cancel();
                }
            });
            var result = Rebalancer.Apply(plan, [image], progress, cts.Token);
            result.Cancelled.Should().BeTrue();
            AssertContent(image, model);
            var rest = Rebalancer.Plan([new RebalanceInput(image, heat)], policy);
            Rebalancer.Apply(rest, [image]).Cancelled.Should().BeFalse();
            Rebalancer.Plan([new RebalanceInput(image, heat)], policy).Moves.Should().BeEmpty();
            AssertContent(image, model);
        }
    }

    [Fact]
    public void Random_heat_and_budgets_never_exceed_the_budget_nor_change_content()
    {
        var (image, model) = Filled("p", size: 8L << 20);
        using (image)
        {
            Gen.Select(Gen.Int[1, 60], Gen.Int[0, 5000], Gen.Double[0.5, 12], Gen.Int[0, int.MaxValue])
                .Sample((pct, ops, exponent, seed) =>
                {
                    var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
                    var rnd = new Random(seed);
                    var clusters = image.Size / image.ClusterSize;
                    for (var i = 0; i < ops; i++)
                    {
                        heat.Record(rnd.Next(4) == 0, (long)(clusters * Math.Pow(rnd.NextDouble(), exponent)) * image.ClusterSize, 512, null);
                    }
                    var budget = image.Size * pct / 100;
                    var policy = new RebalancePolicy { SsdBudgetBytes = budget };
                    Rebalancer.Apply(Rebalancer.Plan([new RebalanceInput(image, heat)], policy), [image]);
                    image.GetTierUsage().SsdBytes.Should().BeLessThanOrEqualTo(budget);
                    Rebalancer.Plan([new RebalanceInput(image, heat)], policy).Moves.Should().BeEmpty();
                }, iter: 12, threads: 1);
            AssertContent(image, model);
        }
    }

    [Fact]
    [Trait("Category", "Heavy")]
    public void Power_cuts_at_every_primary_write_of_an_apply_lose_nothing()
    {
        const long size = 4L << 20;
        const int cluster = 4096;
        var model = new byte[size];
        new Random(9).NextBytes(model);
        var primary = new FaultInjectingStorage(name: _dir.File("crash.qcow2"));
        FaultInjectingStorage? hdd = null;
        ImageStorage Factory(string path, bool writable, bool create) => hdd ??= new FaultInjectingStorage(name: path);
        byte[] basePrimary, baseHdd;
        using (var image = QcowImage.CreateOn(primary, size, new QcowCreateOptions
        {
            ClusterSize = cluster,
            Tier = new QcowTierOptions { DataFile = "crash.hdd", DefaultTier = StorageTier.Hdd },
        }, Factory))
        {
            image.Write(0, model);
            image.Flush();
            basePrimary = primary.DurableImage();
            baseHdd = hdd!.DurableImage();
        }

        // Count the writes of one full apply, then cut at every one of them.
        int total;
        {
            var (p, h, image) = Reopen(basePrimary, baseHdd);
            using (image)
            {
                var before = p.WriteCount;
                Rebalancer.Apply(Plan(image), [image]);
                total = (int)(p.WriteCount - before);
            }
        }
        total.Should().BeGreaterThan(3);
        var step = Math.Max(1, total / 40);
        for (var n = 1; n <= total; n += step)
        {
            var (p, h, image) = Reopen(basePrimary, baseHdd);
            p.CutAtWrite(n);
            try
            {
                Rebalancer.Apply(Plan(image), [image]);
            }
            catch (IOException)
            {
                // the power cut
            }
            var crashP = p.CrashImage(new Random(n));
            var crashH = h.CrashImage(new Random(n + 1));
            var (_, _, after) = Reopen(crashP, crashH, readOnly: true);
            using (after)
            {
                var all = new byte[size];
                after.Read(0, all);
                all.AsSpan().SequenceEqual(model).Should().BeTrue($"a power cut at primary write {n} of {total} must lose nothing");
            }
        }

        RebalancePlan Plan(QcowImage image)
        {
            var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
            for (var c = 0; c < 64; c += 3)
            {
                for (var k = 0; k < 64 - c; k++)
                {
                    heat.RecordRead(c * (long)cluster * 7 % size, 512);
                }
            }
            return Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetBytes = 32 * cluster });
        }

        (FaultInjectingStorage, FaultInjectingStorage, QcowImage) Reopen(byte[] p, byte[] h, bool readOnly = false)
        {
            var ps = new FaultInjectingStorage(p, _dir.File("crash.qcow2"));
            var hs = new FaultInjectingStorage(h, _dir.File("crash.hdd"));
            var img = QcowImage.OpenOn(ps, new QcowOpenOptions { ReadOnly = readOnly }, (_, _, _) => hs);
            return (ps, hs, img);
        }
    }

    /// <summary>
    /// 16 MiB scanned front to back 30 times (sequential) and 8 MiB of scattered 4 KiB reads, 10 per
    /// cluster: by counts alone the scan is hotter.
    /// </summary>
    private static HeatMap ScanAndRandom(QcowImage image)
    {
        var heat = new HeatMap(image.Size, image.ClusterSize, imageId: image.HeatIdentity);
        for (var pass = 0; pass < 30; pass++)
        {
            for (long o = 0; o < 16 << 20; o += 256 << 10)
            {
                heat.RecordRead(o, 128 << 10); // 128 KiB requests: not large enough to count by size alone
                heat.RecordRead(o + (128 << 10), 128 << 10);
            }
        }
        var rnd = new Random(11);
        for (var round = 0; round < 10; round++)
        {
            foreach (var c in Enumerable.Range(0, 128).OrderBy(_ => rnd.Next()))
            {
                heat.RecordRead((32L << 20) + c * (long)Cluster + 4096 * rnd.Next(1, 15), 4096);
            }
        }
        return heat;
    }

    [Fact]
    public void Long_sequential_runs_stay_on_hdd_when_the_policy_says_so()
    {
        var (image, model) = Filled("seq");
        using (image)
        {
            var heat = ScanAndRandom(image);
            heat.GetUnit(40).Sequential.Should().Be(heat.GetUnit(40).Reads, "past its first megabyte every pass of the scan rides on the stream");
            heat.GetUnit(3).Sequential.Should().Be(0, "each pass pays a seek in its first megabyte");

            var byCount = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetBytes = 8 << 20 });
            byCount.Moves.Where(m => m.To == StorageTier.Ssd).Should().OnlyContain(m => m.Start + m.Length <= 16 << 20, "by counts alone the scan is hottest");

            var policy = new RebalancePolicy { SsdBudgetBytes = 8 << 20, SequentialRunBytes = 4 << 20 };
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], policy);
            plan.Notes.Should().Contain(n => n.Contains("sequential run"));
            plan.BytesToSsd.Should().Be(8 << 20);
            plan.Moves.Where(m => m.To == StorageTier.Ssd).Should().OnlyContain(m => m.Start + m.Length <= 1 << 20 || (m.Start >= 32 << 20 && m.Start + m.Length <= 40 << 20),
                "the randomly read clusters and the scan's first megabyte (a seek each pass) gain from SSD; the rest of the scan is served by HDD bandwidth");

            Rebalancer.Apply(plan, [image]);
            image.GetPlacement(0, 1 << 20).Should().OnlyContain(e => e.Tier == StorageTier.Ssd);
            image.GetPlacement(1 << 20, 15 << 20).Should().OnlyContain(e => e.Tier == StorageTier.Hdd);
            image.GetPlacement(32 << 20, 8 << 20).Where(e => e.Tier == StorageTier.Ssd).Sum(e => e.Length).Should().Be(7 << 20);
            Rebalancer.Plan([new RebalanceInput(image, heat)], policy).Moves.Should().BeEmpty("a second run on the same heat moves nothing");
            AssertContent(image, model);
        }
    }

    [Fact]
    public void A_short_sequential_run_is_ranked_by_its_full_heat()
    {
        var (image, _) = Filled("short");
        using (image)
        {
            var heat = ScanAndRandom(image);
            // Runs of 16 MiB are shorter than the 32 MiB the policy asks for: the scan keeps its counts.
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetBytes = 8 << 20, SequentialRunBytes = 32 << 20 });
            plan.Notes.Should().NotContain(n => n.Contains("sequential run"));
            plan.Moves.Where(m => m.To == StorageTier.Ssd).Should().OnlyContain(m => m.Start + m.Length <= 16 << 20);
        }
    }

    [Fact]
    public void The_projected_placement_is_the_placement_after_apply()
    {
        var (image, _) = Filled("proj", StorageTier.Ssd);
        using (image)
        {
            image.Discard(20 << 20, 4 << 20); // a hole the projection must keep
            var heat = Skewed(image);
            var plan = Rebalancer.Plan([new RebalanceInput(image, heat)], new RebalancePolicy { SsdBudgetPercent = 10 });
            plan.Moves.Should().NotBeEmpty();
            var projected = plan.ProjectPlacement(0, image.GetPlacement());
            Rebalancer.Apply(plan, [image]);
            projected.Should().Equal(image.GetPlacement());

            using var png = new MemoryStream();
            HeatRender.WriteRebalancePicture(png, heat, projected, image.GetPlacement(), 640);
            png.ToArray().AsSpan(1, 3).ToArray().Should().Equal((byte)'P', (byte)'N', (byte)'G');
        }
    }

    private sealed class SyncProgress(Action<RebalanceProgress> report) : IProgress<RebalanceProgress>
    {
        public void Report(RebalanceProgress value) => report(value);
    }
}
