using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>MoveToTier's contract (progress, cancellation, refusals) and space accounting on the HDD tier.</summary>
public sealed class TierMoveTests
{
    private static (QcowImage Image, DiskModel Model) Filled(TempDir dir, int cs, long size, StorageTier tier, int seed)
    {
        var img = QcowImage.Create(dir.File("img.qcow2"), size, TierKit.Tiered(cs, defaultTier: tier));
        var model = new DiskModel(size, cs);
        var d = TierKit.RandomBytes(new Random(seed), (int)size);
        img.Write(0, d);
        model.Write(0, d);
        return (img, model);
    }

    [Fact]
    public void Move_reports_progress_per_batch_and_moves_every_cluster_once()
    {
        using var dir = new TempDir();
        const int cs = 512;
        var (img, model) = Filled(dir, cs, 3000L * cs, StorageTier.Ssd, 1);
        using (img)
        {
            var reports = new List<long>();
            var result = img.MoveToTier(100, 2500L * cs, StorageTier.Hdd, new SyncProgress(reports.Add));
            // [100, 100 + 2500 cs) rounds out to clusters 0..2500: 2501 clusters, three batches of at most 1024.
            result.ClustersMoved.Should().Be(2501);
            result.BytesMoved.Should().Be(2501L * cs);
            reports.Should().HaveCount(3).And.BeInAscendingOrder();
            reports[^1].Should().Be(result.BytesMoved);
            var tiers = TierKit.ClusterTiers(img);
            tiers.Take(2501).Should().OnlyContain(t => t == StorageTier.Hdd);
            tiers.Skip(2501).Should().OnlyContain(t => t == StorageTier.Ssd);
            // Moving again moves nothing.
            img.MoveToTier(0, 2501L * cs, StorageTier.Hdd).ClustersMoved.Should().Be(0);
            TierKit.AssertContent(img, model);
            img.Flush();
            TierKit.AssertRefcounts(img);
            TierKit.AssertUsageMatchesPlacement(img);
        }
    }

    [Fact]
    public void Cancelled_move_keeps_what_was_moved_and_the_content()
    {
        using var dir = new TempDir();
        const int cs = 512;
        var (img, model) = Filled(dir, cs, 4096L * cs, StorageTier.Hdd, 2);
        using (img)
        {
            using var cts = new CancellationTokenSource();
            var reports = 0;
            var act = () => img.MoveToTier(0, img.Size, StorageTier.Ssd, new SyncProgress(_ =>
            {
                if (++reports == 2)
                {
                    cts.Cancel();
                }
            }), cts.Token);
            act.Should().Throw<OperationCanceledException>();
            var tiers = TierKit.ClusterTiers(img);
            tiers.Count(t => t == StorageTier.Ssd).Should().Be(2048, "two whole batches were moved before the cancellation");
            tiers.Count(t => t == StorageTier.Hdd).Should().Be(2048);
            TierKit.AssertContent(img, model);
            TierKit.AssertUsageMatchesPlacement(img);
        }
        using var again = QcowImage.Open(dir.File("img.qcow2"));
        TierKit.AssertContent(again, model, "after reopen");
        TierKit.AssertRefcounts(again);
    }

    [Fact]
    public void Moves_are_refused_on_plain_and_read_only_images()
    {
        using var dir = new TempDir();
        using (var plain = QcowImage.Create(dir.File("plain.qcow2"), 1 << 20))
        {
            plain.IsTiered.Should().BeFalse();
            plain.GetTierUsage().Should().Be(new TierUsage(0, 0));
            var move = () => plain.MoveToTier(0, 4096, StorageTier.Hdd);
            move.Should().Throw<InvalidOperationException>().WithMessage("*not*tiered*");
            var pin = () => plain.PinTier(0, 4096, StorageTier.Hdd);
            pin.Should().Throw<InvalidOperationException>();
            var detach = () => plain.DetachTier();
            detach.Should().Throw<InvalidOperationException>();
        }
        using (var t = QcowImage.Create(dir.File("t.qcow2"), 1 << 20, TierKit.Tiered(4096)))
        {
            t.Write(0, new byte[8192]);
            var attach = () => t.AttachTier(new QcowTierOptions { DataFile = "other.hdd" });
            attach.Should().Throw<InvalidOperationException>().WithMessage("*already tiered*");
            File.Exists(dir.File("other.hdd")).Should().BeFalse();
        }
        using var ro = QcowImage.Open(dir.File("t.qcow2"), new QcowOpenOptions { ReadOnly = true });
        ro.IsTiered.Should().BeTrue();
        var roMove = () => ro.MoveToTier(0, 4096, StorageTier.Hdd);
        roMove.Should().Throw<InvalidOperationException>().WithMessage("*read-only*");
        var roPin = () => ro.PinTier(0, 4096, StorageTier.Hdd);
        roPin.Should().Throw<InvalidOperationException>();
        var roPolicy = () => ro.SetTierPolicy(StorageTier.Hdd, 0);
        roPolicy.Should().Throw<InvalidOperationException>();
        ro.GetPlacement().Should().ContainSingle(e => e.Tier == StorageTier.Ssd).Which.Length.Should().Be(8192);
    }

    /// <summary>Clusters freed on the HDD tier alone (nothing freed on the primary) must really be freed.</summary>
    [Theory]
    [InlineData("discard")]
    [InlineData("zero-unmap")]
    [InlineData("overwrite-after-move")]
    public void Space_freed_on_the_hdd_tier_is_reused(string how)
    {
        using var dir = new TempDir();
        const int cs = 4096;
        const long size = 4L << 20;
        var path = dir.File("img.qcow2");
        var hdd = dir.File("data.hdd");
        var rng = new Random(how.Length);
        var model = new DiskModel(size, cs);
        using (var img = QcowImage.Create(path, size, TierKit.Tiered(cs, defaultTier: StorageTier.Hdd)))
        {
            var d = TierKit.RandomBytes(rng, 1 << 20);
            img.Write(0, d);
            model.Write(0, d);
        }
        var hddLength = new FileInfo(hdd).Length;
        using (var img = QcowImage.Open(path))
        {
            switch (how)
            {
                case "discard":
                    img.Discard(0, 1 << 20);
                    model.Discard(0, 1 << 20);
                    break;
                case "zero-unmap":
                    img.WriteZeroes(0, 1 << 20, mayUnmap: true);
                    model.Zero(0, 1 << 20);
                    break;
                default:
                    // The clusters move to SSD: their HDD copies are freed, nothing is freed on the primary.
                    img.MoveToTier(0, 1 << 20, StorageTier.Ssd);
                    break;
            }
        }
        using (var img = QcowImage.Open(path))
        {
            TierKit.AssertRefcounts(img, because: $"after {how} and a clean close");
            img.GetTierUsage().HddBytes.Should().Be(0);
            var d = TierKit.RandomBytes(rng, 1 << 20);
            img.Write(2L << 20, d);
            model.Write(2L << 20, d);
            TierKit.AssertContent(img, model);
        }
        new FileInfo(hdd).Length.Should().Be(hddLength, "the new HDD clusters reuse the freed ones");
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            TierKit.AssertRefcounts(img);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    [Fact]
    public void Tiered_image_from_a_stream_needs_the_data_file_named()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        var model = new DiskModel(1 << 20, 4096);
        using (var img = QcowImage.Create(path, 1 << 20, TierKit.Tiered(4096, defaultTier: StorageTier.Hdd)))
        {
            var d = TierKit.RandomBytes(new Random(3), 300000);
            img.Write(1000, d);
            model.Write(1000, d);
        }
        var bytes = File.ReadAllBytes(path);
        var act = () => QcowImage.Open(new MemoryStream(bytes), new QcowOpenOptions { ReadOnly = true });
        act.Should().Throw<QcowException>().WithMessage("*TierDataFile*");
        using (var img = QcowImage.Open(new MemoryStream(bytes), new QcowOpenOptions { ReadOnly = true, TierDataFile = dir.File("data.hdd") }))
        {
            img.IsTiered.Should().BeTrue();
            TierKit.AssertContent(img, model);
        }
        // A FileStream carries its name: the data file is found next to it.
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        using var fromFile = QcowImage.Open(fs);
        fromFile.TierDataFile.Should().Be(dir.File("data.hdd"));
        TierKit.AssertContent(fromFile, model);
    }

    /// <summary>preallocation=metadata on a tiered image: the preallocated (sparse) clusters move like any other.</summary>
    [Fact]
    public void Preallocated_tiered_image_moves_and_detaches_clean()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const int cs = 65536;
        const long size = 8 << 20;
        var model = new DiskModel(size, cs);
        var options = new QcowCreateOptions
        {
            ClusterSize = cs,
            Preallocation = QcowPreallocation.Metadata,
            Tier = new QcowTierOptions { DataFile = "data.hdd", DefaultTier = StorageTier.Hdd },
        };
        using (var img = QcowImage.Create(path, size, options))
        {
            TierKit.ClusterTiers(img).Should().OnlyContain(t => t != null, "every cluster is preallocated");
            var d = TierKit.RandomBytes(new Random(2), 300000);
            img.Write(5000, d);
            model.Write(5000, d);
            TierKit.ClusterTiers(img).Should().OnlyContain(t => t == StorageTier.Hdd, "preallocation follows the default tier");
            img.MoveToTier(0, size / 2, StorageTier.Ssd);
            TierKit.ClusterTiers(img).Take((int)(size / 2 / cs)).Should().OnlyContain(t => t == StorageTier.Ssd);
            TierKit.AssertContent(img, model);
            img.Flush();
            TierKit.AssertRefcounts(img);
            TierKit.AssertUsageMatchesPlacement(img).Should().Be(new TierUsage(size / 2, size / 2));
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    /// <summary>Progress that reports on the calling thread (Progress&lt;T&gt; posts to the thread pool).</summary>
    private sealed class SyncProgress(Action<long> report) : IProgress<long>
    {
        public void Report(long value) => report(value);
    }
}
